"""What a run shows on the console: ε-DPO's own INFO lines at default log settings, and not the CPU-only noise of
optional kernels that importing TRL pulls in.

- ε-DPO's lines (which head ran, β restored on resume, the first-step check) are INFO records of loggers under
  ``edpo_plugin``. Python shows no INFO record until an application configures logging, and neither TRL nor
  transformers does (transformers gives its own loggers a handler). The ``edpo_plugin`` logger gets level INFO and a
  stderr handler that writes only while the root logger has no handler; once the application configures logging
  (``logging.basicConfig``, pytest's capture, Axolotl — see ``edpo_plugin/axolotl``), records reach its handlers by
  propagation alone. Quieter: ``logging.getLogger("edpo_plugin").setLevel(logging.WARNING)``.
- Importing TRL imports PEFT (which imports bitsandbytes) and transformers' quantizers (which import torchao). On a
  machine without CUDA torchao prints that its CUDA kernel libraries do not load (``Failed to load
  …/torchao/_C_….so``: they cannot run there; on a CUDA machine the lines stay). On every machine torch notes that
  torchao's enums use a deprecated registration (for torchao's developers), and bitsandbytes that its optional CPU
  4-bit kernel from the Hub did not load (``Failed to load CPU gemm_4bit_forward …`` and a Hub trust-check warning;
  it falls back to its own). Filters on those loggers drop exactly these records, installed before TRL is imported;
  when the application or Axolotl imports these packages first, the lines print as before.

Imports only the standard library and torch.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Callable

import torch

LIBRARY_LOGGER = "edpo_plugin"


class _UntilLoggingIsConfigured(logging.StreamHandler):
    """stderr for ``edpo_plugin``'s records while the root logger has no handler (nothing else would show them)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


class _DropRecords(logging.Filter):
    """Drops the records of one logger for which ``noise(record)`` holds."""

    def __init__(self, noise: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.noise = noise

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.noise(record)


def _torchao_cuda_library(record: logging.LogRecord) -> bool:
    """torchao's ``Failed to load …/torchao/_C_….so`` for its CUDA kernel libraries, on a machine without CUDA."""
    message = record.getMessage()
    return not torch.cuda.is_available() and bool(re.match(r"Failed to load \S*torchao[/\\]_C", message))


def _torchao_enum_deprecation(record: logging.LogRecord) -> bool:
    """torch's note that registering an Enum as a pytree constant is deprecated, for torchao's own enums."""
    cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return "is an Enum subclass" in str(record.msg) and getattr(cls, "__module__", "").startswith("torchao")


def _bitsandbytes_cpu_hub_kernel(record: logging.LogRecord) -> bool:
    """bitsandbytes' optional CPU 4-bit kernel from the Hub not loading (it falls back to its own)."""
    return record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


_NOISE = {
    "torchao": _torchao_cuda_library,
    "torch.utils._pytree": _torchao_enum_deprecation,
    "bitsandbytes.backends.cpu.ops": _bitsandbytes_cpu_hub_kernel,
}
_HUB_TRUST_WARNING = r"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"


def show_info_lines() -> None:
    """``edpo_plugin``'s loggers show INFO records, on stderr while the application has configured no logging."""
    library = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(h, _UntilLoggingIsConfigured) for h in library.handlers):
        library.addHandler(_UntilLoggingIsConfigured())
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO)


def quiet_cpu_kernel_noise() -> None:
    """Install the filters of :data:`_NOISE` (idempotent); to run before TRL is first imported."""
    for name, noise in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) for f in logger.filters):
            logger.addFilter(_DropRecords(noise))
    warnings.filterwarnings("ignore", message=_HUB_TRUST_WARNING, category=UserWarning)
