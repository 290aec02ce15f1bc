"""A range of frozen blocks as an ONNX file, float32 or int8, made once and kept on disk.

ONNX is what the CPU runtimes (ONNX Runtime, OpenVINO) read. Exporting takes seconds
(torch.export, then onnxscript), so a graph is saved under a name that is the digest of
everything it depends on (its weights, input shape, torch's and onnx's versions, and for
int8 the calibration images): a restart, a second replica on the same disk or a test reuses
it, and a change to any of those makes a new one.
"""

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from torch import nn

log = logging.getLogger(__name__)

# The largest batch a graph accepts: its batch dimension is dynamic, between 1 and this.
MAX_BATCH = 4096
# How a graph is quantized to int8 (part of the file's name: a change makes new files): QDQ, int8 weights per
# channel, uint8 activations whose ranges are the 99.99th percentile of the calibration images' values (min-max
# ranges, stretched by rare outliers, left MobileNetV2's features at cosine 0.94 to float32's, this at 0.98).
QUANTIZATION = "qdq-s8-perchannel-u8-percentile99.99"
CALIBRATION_PERCENTILE = 99.99


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/graft/trunks`` (default ``~/.cache/graft/trunks``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graft" / "trunks"


class GraphCache:
    """ONNX files of trunk graphs in one folder. A folder this process cannot write (an image's, made at build
    time) is still read; what is missing from it is then made in a private temporary folder."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or default_cache_dir()
        self._scratch: Path | None = None

    def _find_or_make(self, name: str, make: Callable[[Path], None]) -> Path:
        for folder in (self.folder, self._scratch):
            if folder is not None and (folder / name).exists():
                return folder / name
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            return _write(self.folder / name, make)
        except OSError as exc:  # a read-only folder (an image's), or one of another user's
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="graft-trunks-"))
                log.warning("cannot write trunk graphs to %s (%s): using %s", self.folder, exc, self._scratch)
            return _write(self._scratch / name, make)

    def float32(self, label: str, module: nn.Module, example: torch.Tensor) -> Path:
        """``module`` (float32, on the CPU) exported for inputs shaped like ``example`` but for the batch size."""
        name = f"{_safe(label)}-{_digest(label, module, example)}.onnx"

        def export(target: Path) -> None:
            log.info("exporting %s to ONNX (once; kept as %s)", label, target.name)
            _export(module, example, target)

        return self._find_or_make(name, export)

    def int8(self, float32: Path, calibration: torch.Tensor) -> Path:
        """The float32 graph quantized to int8 (``QUANTIZATION``), its activation ranges calibrated on
        ``calibration``."""
        digest = hashlib.sha256(f"{float32.name}|{QUANTIZATION}".encode())
        digest.update(calibration.numpy().tobytes())
        name = f"{float32.stem}-int8-{digest.hexdigest()[:16]}.onnx"

        def quantize(target: Path) -> None:
            log.info("quantizing %s to int8 on %d calibration images", float32.name, len(calibration))
            _quantize(float32, calibration, target)

        return self._find_or_make(name, quantize)


def _write(path: Path, make: Callable[[Path], None]) -> Path:
    """``make`` the file under a temporary name beside ``path``, then rename it: a reader never sees half a file."""
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        target = Path(work) / path.name
        make(target)
        os.replace(target, path)
    return path


def _digest(label: str, module: nn.Module, example: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{label}|{tuple(example.shape[1:])}|{torch.__version__}|{onnx.__version__}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


@contextmanager
def _exporter_quiet() -> Iterator[None]:
    """The exporter's notes on its own passes (warnings, INFO logs of every rewrite) are not graft's news."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _export(module: nn.Module, example: torch.Tensor, target: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with _exporter_quiet(), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["features"],
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns the program
    program.save(str(target))


def _quantize(float32: Path, calibration: torch.Tensor, target: Path) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration.split(8))

        def get_next(self) -> dict[str, object] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.contiguous().numpy()}

    prepared = target.with_name("prepared.onnx")
    quant_pre_process(str(float32), str(prepared))
    with contextlib.redirect_stdout(sys.stderr):  # the calibrator prints its progress; stdout is the caller's
        quantize_static(
            str(prepared),
            str(target),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": CALIBRATION_PERCENTILE},
        )
