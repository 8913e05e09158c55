"""Model directories of the published configurations in ``plans/sources/`` for
``load_format="dummy"`` engines: the configuration with SmolLM2's tokenizer
(vocabulary and special tokens size the embedding only; the fingerprint does not
see them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SOURCES = Path(__file__).resolve().parent.parent / "plans" / "sources"


def published_model_dir(name: str, tokenizer_dir: Path, out: Path) -> Path:
    """``name``: a folder of ``plans/sources`` (``meta-llama--Llama-3.2-1B-Instruct``)."""
    config = json.loads((SOURCES / name / "config.json").read_text())
    config.update(vocab_size=49152, bos_token_id=1, eos_token_id=2)
    (out / "config.json").write_text(json.dumps(config))
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_dir / file, out / file)
    return out
