"""What tools/device_check.sh runs on: Python, torch and its CUDA build, the GPU, the package's
location and a few versions. Exits non-zero, with a one-line reason, when torch sees no GPU or
the package does not import: the check stops there."""

from __future__ import annotations

import platform
import sys


def main() -> int:
    import torch

    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}")
    if not torch.cuda.is_available():
        print("device_env: torch.cuda.is_available() is False: no GPU this torch can use")
        return 3
    props = torch.cuda.get_device_properties(0)
    print(
        f"GPU 0 of {torch.cuda.device_count()}: {props.name}, {props.total_memory / 2**30:.1f} "
        f"GiB, compute capability {props.major}.{props.minor}, cuDNN {torch.backends.cudnn.version()}"
    )
    import hardneg

    print(f"hardneg from {hardneg.__file__}")
    for module in ("numpy", "pytest", "triton"):
        try:
            print(f"{module} {__import__(module).__version__}")
        except ImportError:
            print(f"{module}: not installed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
