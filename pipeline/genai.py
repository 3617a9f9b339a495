"""An onnxruntime-genai model folder for an ONNX Runtime engine: its graph, genai_config.json, the tokenizer.

onnxruntime-genai runs its own generation loop over the graph; the config tells it the graph's input and
output names (layer patterns with %d), the model type, the geometry and the search defaults. This
project's graphs concatenate the past with the new keys and values, so the config says
`past_present_share_buffer: false`. genai takes the layer and head counts from the graph's static
dimensions and would not notice a wrong value in the config, so `check_config` compares every number
with the graph and the Hugging Face config before the folder is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import RecipeError

CONFIG = "genai_config.json"
# model types onnxruntime-genai 0.18 runs with this project's graphs (measured: olmo2, stablelm and gpt_neox
# are refused by its loader, gpt2's graph fails on an input name)
TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma2", "gemma3_text", "granite")


def check_model_type(model_type: str, where: str) -> None:
    if model_type not in TYPES:
        raise RecipeError(f"{where}: format genai: onnxruntime-genai does not run model type {model_type!r} with this "
                          f"project's graphs (it runs {', '.join(TYPES)}); package this model with format: triton")


def genai_config(hf: dict[str, Any], io: dict[str, Any], threads: int) -> dict[str, Any]:
    """genai_config.json for a graph with this project's I/O names (io.json) and the model's HF config."""
    eos = hf.get("eos_token_id")
    pad = hf.get("pad_token_id")
    context = int(hf.get("max_position_embeddings") or hf.get("n_positions") or 2048)
    return {
        "model": {
            "type": hf["model_type"],
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "vocab_size": io["vocab_size"],
            "context_length": context,
            "decoder": {
                "filename": "model.onnx",
                # the engine was optimized offline and verified as it is: genai opens it with optimizations off
                "session_options": {"log_id": "enginewright", "provider_options": [], "intra_op_num_threads": threads,
                                    "graph_optimization_level": "ORT_DISABLE_ALL"},
                "head_size": io["head_dim"],
                "hidden_size": hf.get("hidden_size") or hf.get("n_embd"),
                "num_attention_heads": hf.get("num_attention_heads") or hf.get("n_head"),
                "num_hidden_layers": io["num_layers"],
                "num_key_value_heads": io["kv_heads"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
                   "top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
                   "past_present_share_buffer": False},
    }


def check_config(config: dict[str, Any], graph: Any) -> list[str]:
    """Problems between genai_config.json and the graph it names (names, layer count, KV heads, head size)."""
    from .tensorrt.profiles import graph_inputs_of, graph_outputs_of

    decoder = config["model"]["decoder"]
    inputs = {g.name: g for g in graph_inputs_of(graph)}
    outputs = {g.name: g for g in graph_outputs_of(graph)}
    problems = []
    for role, name in decoder["inputs"].items():
        if "%d" not in name and name not in inputs:
            problems.append(f"input {role} names {name}, which the graph does not have")
    layers = decoder["num_hidden_layers"]
    for kind, pattern in (("key", decoder["inputs"]["past_key_names"]), ("value", decoder["inputs"]["past_value_names"])):
        names = [pattern % i for i in range(layers)]
        missing = [n for n in names if n not in inputs]
        if missing:
            problems.append(f"past {kind} inputs for {layers} layers: the graph lacks {missing[:2]}")
            continue
        if pattern % layers in inputs:
            problems.append(f"the graph has more than num_hidden_layers {layers} past {kind} inputs")
        dims = inputs[names[0]].dims
        if len(dims) != 4 or dims[1] != decoder["num_key_value_heads"] or dims[3] != decoder["head_size"]:
            problems.append(f"{names[0]} has dims {list(dims)}; the config says {decoder['num_key_value_heads']} KV "
                            f"heads of size {decoder['head_size']}")
    for pattern in (decoder["outputs"]["present_key_names"], decoder["outputs"]["present_value_names"]):
        if any(pattern % i not in outputs for i in range(layers)):
            problems.append(f"the graph lacks outputs {pattern} for {layers} layers")
    if decoder["outputs"]["logits"] not in outputs:
        problems.append("the graph has no logits output")
    return problems


def generate(folder: Path, prompt: list[int], tokens: int) -> list[int]:
    """Greedy tokens onnxruntime-genai generates from `prompt` with the model in `folder`."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out: list[int] = []
    while not generator.is_done() and len(out) < tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    del generator, model
    return out
