import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the numeric helpers

if not torch.cuda.is_available():  # the generated Triton kernels run in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
