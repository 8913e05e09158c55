"""Which layers a retrieval task needs: a plan's accuracy with the full span given
back to one band of layers at a time, beside dense and the equal-density uniform
window, through the planner's exact-mask forward (HF, fp32; not the engine, so
seconds per prompt). A diagnostic of the search, not a result: the eval measures
plans through vLLM.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/span_probe.py \\
        --plan plans/smollm2-135m-moa-0.5.json --task needle --length 1024 --band 6
"""

from __future__ import annotations

import argparse

from tqdm import tqdm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=".models/smollm2")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--task", default="needle", choices=["passkey", "needle", "lines"])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--depths", type=int, default=12, help="depths spread over 0..1")
    ap.add_argument("--samples", type=int, default=2, help="prompts per depth")
    ap.add_argument("--seed", type=int, default=7, help="not the eval's seed (0)")
    ap.add_argument("--band", type=int, default=0,
                    help="also give the full span to each band of this many layers")
    args = ap.parse_args()

    from moa_vllm.evaluation.machine import provenance, provenance_lines
    from moa_vllm.tasks import is_correct, make_samples
    from moa_vllm.plan import load_plan, uniform_plan
    from moa_vllm.planner.profile import load_model, masked_generate

    model, tok = load_model(args.model)
    plan = load_plan(args.plan)
    depths = [i / max(1, args.depths - 1) for i in range(args.depths)]
    samples = make_samples(tok, [args.task], [args.length], depths, args.samples, args.seed)
    density = plan.provenance.details.get("density", 0.5)
    variants = {"dense": None, "plan": plan,
                f"uniform-{density}": uniform_plan(plan.model, density, grow=True,
                                                   sink_tokens=plan.sink_tokens,
                                                   elastic=plan.elastic,
                                                   min_window=plan.min_window,
                                                   granule=plan.granule)}
    layers = plan.model.num_layers
    for first in range(0, layers if args.band else 0, args.band or 1):
        band = range(first, min(layers, first + args.band))
        full = plan.model_copy(deep=True)
        for layer in band:
            full.rules[layer] = [(plan.model.max_position_embeddings, 0.0)] * len(plan.rules[layer])
        variants[f"plan, layers {band.start}-{band.stop - 1} full"] = full
    print("\n".join(provenance_lines(provenance([args.plan]))))
    print(f"{args.task} at {args.length} tokens, {len(samples)} prompts, seed {args.seed}")
    for name, variant in variants.items():
        hits = 0
        for s in tqdm(samples, desc=name, leave=False):
            ids = tok(s.prompt, add_special_tokens=False)["input_ids"]
            hits += is_correct(s, tok.decode(masked_generate(model, tok, variant, ids, 12)))
        print(f"{name:32s} {hits / len(samples):.2f}", flush=True)


if __name__ == "__main__":
    main()
