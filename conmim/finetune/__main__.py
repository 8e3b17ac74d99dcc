import sys

from conmim.finetune.run import main

sys.exit(main())
