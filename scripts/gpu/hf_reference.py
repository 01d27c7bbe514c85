#!/usr/bin/env python3
"""transformers + PEFT on the same weights, adapter and token ids as `bot bench`
(issue 7's side-by-side benchmark). Runs on the GPU machine (torch 2.11,
transformers 5.x, peft 0.21; no network) and on a CPU for a check.

    # measure: the directory from `bot export-hf`, a PEFT adapter, the ids from `bot bench --dump-ids`
    python3 scripts/gpu/hf_reference.py --model DIR --adapter ADAPTER --ids IDS.jsonl --out hf.json
    # the Gemma-3-1B shape with random weights and a random r 16 LoRA adapter (DIR/adapter)
    python3 scripts/gpu/hf_reference.py --make-1b DIR --tokenizer EXPORT/tokenizer.json

What it measures (bf16 on CUDA, f32 on CPU; warm-up first, the device
synchronised before every clock read):
- one forward over the typical prompt (system prefix + the median-length
  message), PEFT unmerged and merged;
- the original's method: `generate` up to 40 new tokens (greedy, stopping at
  the end of turn), then a regex for the call; p50/p95 at batch 1;
- the fair method, our early stop: the route from the first token (with the
  adapter's call threshold, as the router), chat stops there; a call gets the
  rest of the fixed call opening in one forward, then greedy tokens until the
  call closes; p50/p95 of the decision and of the whole image call;
- decode ms per token (greedy, the next token kept on the device);
- forward-only throughput (one forward over each prompt, the route from the
  last position's logits) with 1, 8, 32, 128 messages together;
- whether its routes and logits agree with ours on the same ids;
- LoRA training tokens/s (AdamW, bf16 base, fp32 adapter) and peak memory;
- HBM copy bandwidth, and the floor: weight bytes read per decode step / it.
Unmerged PEFT is measured first; everything after "merged" uses the merged
model, as our router does.
"""
import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import time

import torch

CALL_RE = re.compile(r'^call\(\s*"generate_image"\s*,\s*(\{.*\})\s*\)$', re.S)


def log(*a):
    print(*a, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def now(dev):
    sync(dev)
    return time.perf_counter()


def stats(ms):
    if not ms:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "mean_ms": None}
    s = sorted(ms)
    pick = lambda q: s[round((len(s) - 1) * q)]
    return {"n": len(s), "p50_ms": pick(0.5), "p95_ms": pick(0.95), "mean_ms": sum(s) / len(s)}


def fmt(st):
    if not st["n"]:
        return "none"
    return f"p50 {st['p50_ms']:.2f} ms, p95 {st['p95_ms']:.2f} ms (n {st['n']})"


def read_ids(path):
    meta, msgs = None, []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row["kind"] == "meta":
                meta = row
            else:
                msgs.append(row)
    if meta is None or not msgs:
        sys.exit(f"{path}: expected a meta line and message lines (bot bench --dump-ids)")
    return meta, msgs


def parse_call(text):
    """The prompt of a complete, valid call, else None (the router's strict parse)."""
    m = CALL_RE.match(text.strip())
    if not m:
        return None
    try:
        obj = json.loads(m.group(1))
    except ValueError:
        return None
    p = obj.get("prompt") if isinstance(obj, dict) else None
    return p.strip() if isinstance(p, str) and p.strip() else None


def padded(rows, pad, dev):
    """Left-padded ids, attention mask and positions (pads at position 0)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(dev), mask.to(dev), pos.to(dev)


def load_base(path, dev, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev)
    return model.eval()


class Reference:
    def __init__(self, args, meta, msgs, dev, dtype):
        from tokenizers import Tokenizer

        self.args, self.meta, self.msgs, self.dev, self.dtype = args, meta, msgs, dev, dtype
        self.tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
        self.stop = set(meta["stop_ids"])
        self.call_ids = meta["call_prefix_ids"]
        self.threshold = meta.get("call_threshold")
        self.pad = 0
        self.typical = msgs[meta["typical"]]["ids"]

    # ---- pieces
    def forward_ms(self, model, reps):
        ids = torch.tensor([self.typical], device=self.dev)

        def once():
            model(input_ids=ids, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()

        for _ in range(3):
            once()
        out = []
        for _ in range(reps):
            t = now(self.dev)
            once()
            out.append((now(self.dev) - t) * 1e3)
        return statistics.median(out)

    def first_token(self, logits):
        """The router's first token: arg-max, or the call opening when its
        probability reaches the threshold (the best other token below it)."""
        call = self.call_ids[0]
        probs = torch.softmax(logits.float(), -1)
        p_call = probs[call].item()
        if self.threshold is not None:
            if p_call >= self.threshold:
                return call, p_call
            probs[call] = -1.0
        return int(probs.argmax().item()), p_call

    def original(self, model, rows):
        """generate up to N new tokens, then the regex: latency per message."""
        out = []
        for ids in rows[:2]:  # warm-up
            self._generate(model, ids)
        for ids in rows:
            t = now(self.dev)
            new = self._generate(model, ids)
            ms = (now(self.dev) - t) * 1e3
            text = self.tok.decode(new, skip_special_tokens=False)
            out.append((ms, len(new), parse_call(text) is not None))
        return out

    def _generate(self, model, ids):
        x = torch.tensor([ids], device=self.dev)
        y = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=self.args.generate,
            do_sample=False,
            eos_token_id=sorted(self.stop),
            pad_token_id=self.pad,
        )
        new = y[0, len(ids):].tolist()
        while new and new[-1] in self.stop:
            new.pop()
        return new

    def fair(self, model, ids, max_new=96):
        """Our early stop; returns (decision ms, total ms, call opened, valid
        call, new tokens, p_call)."""
        t = now(self.dev)
        out = model(input_ids=torch.tensor([ids], device=self.dev), use_cache=True, logits_to_keep=1)
        tok, p_call = self.first_token(out.logits[0, -1])
        decision_ms = (now(self.dev) - t) * 1e3
        if tok != self.call_ids[0]:
            return decision_ms, decision_ms, False, False, 1, p_call
        gen = list(self.call_ids)
        feed = self.call_ids[1:] or [tok]
        pkv = out.past_key_values
        image = False
        while len(gen) < max_new:
            out = model(input_ids=torch.tensor([feed], device=self.dev), past_key_values=pkv,
                        use_cache=True, logits_to_keep=1)
            pkv = out.past_key_values
            nxt = int(out.logits[0, -1].argmax().item())
            if nxt in self.stop:
                break
            gen.append(nxt)
            text = self.tok.decode(gen, skip_special_tokens=False)
            if parse_call(text) is not None:
                image = True
                break
            if text.rstrip().endswith(")"):
                break
            feed = [nxt]
        total_ms = (now(self.dev) - t) * 1e3
        return decision_ms, total_ms, True, image, len(gen), p_call

    def decode_ms(self, model, steps):
        ids = torch.tensor([self.typical], device=self.dev)

        def once(n):
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = now(self.dev)
            for _ in range(n):
                out = model(input_ids=nxt, past_key_values=pkv, use_cache=True, logits_to_keep=1)
                pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            nxt.tolist()
            return (now(self.dev) - t) * 1e3 / n

        once(4)
        return statistics.median(once(steps) for _ in range(3))

    def p_calls(self, model, rows, batch=32):
        """Call-opening probability at the first position of every row, batched."""
        out = []
        for i in range(0, len(rows), batch):
            ids, mask, pos = padded(rows[i:i + batch], self.pad, self.dev)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
            probs = torch.softmax(logits[:, -1].float(), -1)
            out.extend(probs[:, self.call_ids[0]].tolist())
        return out

    def throughput(self, model, rows, sizes):
        result = []
        for b in sizes:
            n_batches = max(2, math.ceil(min(len(rows), 64) / b))
            pool = [rows[i % len(rows)] for i in range(b * n_batches)]
            batches = [padded(pool[i:i + b], self.pad, self.dev) for i in range(0, len(pool), b)]

            def run(bt):
                ids, mask, pos = bt
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
                return logits[:, -1].argmax(-1)

            run(batches[0]).tolist()  # warm-up
            t = now(self.dev)
            for bt in batches:
                run(bt).tolist()
            s = now(self.dev) - t
            result.append({"batch": b, "messages": len(pool), "messages_per_s": len(pool) / s})
            log(f"  forward-only, {b} together: {len(pool) / s:.1f} msg/s")
        return result

    # ---- training
    def train(self, r, alpha, targets, seq_len):
        """LoRA training steps on batches of `seq_len` ids cut from the prompts:
        tokens/s over the timed steps and peak memory."""
        from peft import LoraConfig, get_peft_model

        a = self.args
        base = load_base(a.model, self.dev, self.dtype)
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, target_modules=targets,
                         task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
        # Rows: the prompts' ids (system prefix + message) one after another,
        # cut every seq_len tokens.
        stream = [i for m in self.msgs for i in m["ids"]]
        while len(stream) < seq_len * a.train_batch:
            stream += stream
        rows = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
        batches = []
        for s in range(a.train_steps + a.train_warmup):
            pick = [rows[(s * a.train_batch + i) % len(rows)] for i in range(a.train_batch)]
            batches.append(torch.tensor(pick, device=self.dev))
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)

        def step(x):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for x in batches[:a.train_warmup]:
            step(x)
        t = now(self.dev)
        for x in batches[a.train_warmup:]:
            loss = step(x)
        loss = loss.item()
        s = now(self.dev) - t
        tokens = a.train_steps * a.train_batch * seq_len
        out = {
            "r": r, "alpha": alpha, "targets": targets, "batch": a.train_batch, "seq_len": seq_len,
            "steps": a.train_steps, "tokens_per_s": tokens / s, "s_per_step": s / a.train_steps,
            "last_loss": loss, "trainable_parameters": sum(p.numel() for p in params),
        }
        if self.dev.type == "cuda":
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.dev) / 2**30
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.dev) / 2**30
        del model, base, opt, params, batches
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        log(f"LoRA training r {r} on {'+'.join(targets)}, {a.train_batch} x {seq_len}: "
            f"{out['tokens_per_s']:.0f} tokens/s")
        return out


def hbm_copy_tb_s(dev, gib=2):
    n = gib << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    reps = 10
    t = now(dev)
    for _ in range(reps):
        b.copy_(a)
    s = now(dev) - t
    del a, b
    return 2 * n * reps / s / 1e12  # bytes read + written


def measure(args):
    from peft import PeftModel
    import transformers
    import peft

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype or ("bf16" if dev.type == "cuda" else "f32")]
    meta, msgs = read_ids(args.ids)
    skip = set(filter(None, args.skip.split(",")))
    ref = Reference(args, meta, msgs, dev, dtype)
    res = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "dtype": str(dtype).replace("torch.", ""), "model": args.model, "adapter": args.adapter,
        "prompt_tokens": len(ref.typical), "call_threshold": ref.threshold,
    }
    torch.manual_seed(0)
    reps = 20 if dev.type == "cuda" else 3
    rows = [m["ids"] for m in msgs]
    lat_rows = rows[:args.latency_limit]
    with torch.inference_mode():
        base = load_base(args.model, dev, dtype)
        res["attn_implementation"] = base.config._attn_implementation
        model = PeftModel.from_pretrained(base, args.adapter) if args.adapter else base
        model.eval()
        if args.adapter:
            res["forward_ms_unmerged"] = ref.forward_ms(model, reps)
            log(f"one forward over {len(ref.typical)} tokens, PEFT unmerged: {res['forward_ms_unmerged']:.2f} ms")
        if "original" not in skip and args.original_unmerged and args.adapter:
            o = ref.original(model, lat_rows)
            res["original"] = summarize_original(o, "unmerged", args.generate)
        if args.adapter:
            model = model.merge_and_unload()
            model.eval()
        res["forward_ms_merged"] = ref.forward_ms(model, reps)
        log(f"one forward over {len(ref.typical)} tokens, merged: {res['forward_ms_merged']:.2f} ms")
        res["prefill_tokens_per_s"] = len(ref.typical) / (res["forward_ms_merged"] / 1e3)
        if "original" not in skip and "original" not in res:
            o = ref.original(model, lat_rows)
            res["original"] = summarize_original(o, "merged" if args.adapter else "base", args.generate)
        if "fair" not in skip:
            ref.fair(model, lat_rows[0])
            f = [ref.fair(model, ids) for ids in lat_rows]  # (decision, total, opened, image, tokens, p)
            calls = [x for x in f if x[2]]
            res["fair"] = {
                "decision_chat": stats([x[0] for x in f if not x[2]]),
                "decision_image": stats([x[0] for x in calls]),
                "image_call": stats([x[1] for x in calls]),
                "valid_calls": sum(1 for x in calls if x[3]),
                "mean_new_tokens_image": sum(x[4] for x in calls) / max(1, len(calls)),
            }
            log(f"fair (our early stop): decision chat {fmt(res['fair']['decision_chat'])}; "
                f"decision image {fmt(res['fair']['decision_image'])}; image call {fmt(res['fair']['image_call'])}")
        if "decode" not in skip:
            res["decode_ms_per_token"] = ref.decode_ms(model, args.decode_steps)
            log(f"decode: {res['decode_ms_per_token']:.3f} ms per token")
        if "throughput" not in skip:
            res["throughput"] = ref.throughput(model, rows, [int(b) for b in args.batch_sizes.split(",")])
        if "agreement" not in skip and any(m.get("route") for m in msgs):
            p = ref.p_calls(model, rows)
            ours = [(m.get("route"), m.get("call_probability")) for m in msgs]
            same, diffs, n = 0, [], 0
            for pc, (route, op) in zip(p, ours):
                if route is None:
                    continue
                n += 1
                mine = pc >= ref.threshold if ref.threshold is not None else None
                if mine is not None:
                    same += (route == "image") == mine
                diffs.append(abs(pc - op))
            res["agreement"] = {"messages": n, "same_route": same if ref.threshold is not None else None,
                                "max_call_probability_diff": max(diffs) if diffs else None}
            top = meta.get("typical_top_logits")
            if top:
                logits = model(input_ids=torch.tensor([ref.typical], device=dev), logits_to_keep=1).logits[0, -1].float()
                res["agreement"]["typical_top_logits"] = [[i, ours_l, logits[i].item()] for i, ours_l in top]
                res["agreement"]["max_top_logit_diff"] = max(abs(o - h) for _, o, h in res["agreement"]["typical_top_logits"])
            log(f"agreement with ours: {res['agreement']}")
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        res["weight_bytes_per_decode_step"] = weight_bytes
        del model, base
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if "train" not in skip:
        res["train"] = []
        for recipe in args.train_recipes.split():
            r, alpha, targets, seq_len = recipe.split(":")
            res["train"].append(ref.train(int(r), float(alpha), targets.split("+"), int(seq_len)))
    if "bandwidth" not in skip and dev.type == "cuda":
        torch.cuda.empty_cache()
        res["hbm_copy_tb_s"] = hbm_copy_tb_s(dev)
        res["floor_ms_per_decode_step"] = weight_bytes / (res["hbm_copy_tb_s"] * 1e12) * 1e3
        log(f"HBM copy {res['hbm_copy_tb_s']:.2f} TB/s; floor {res['floor_ms_per_decode_step']:.3f} ms per step "
            f"({weight_bytes / 1e6:.0f} MB of weights)")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    log(f"wrote {args.out}")


def summarize_original(o, which, max_new):
    out = {
        "model": which, "max_new_tokens": max_new, "all": stats([x[0] for x in o]),
        "image": stats([x[0] for x in o if x[2]]), "chat": stats([x[0] for x in o if not x[2]]),
        "mean_new_tokens": sum(x[1] for x in o) / max(1, len(o)),
        "ms_per_new_token": sum(x[0] for x in o) / max(1, sum(x[1] for x in o)),
    }
    log(f"original's method (generate, {which}): {fmt(out['all'])}, {out['mean_new_tokens']:.1f} new tokens")
    return out


def make_1b(args):
    """The Gemma-3-1B shape (google/gemma-3-1b-it's config) with random bf16
    weights, the 270M export's tokenizer, and a random LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out = args.make_1b
    os.makedirs(out, exist_ok=True)
    layers = 26
    cfg = Gemma3TextConfig(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        rms_norm_eps=1e-6, sliding_window=512, max_position_embeddings=32768,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=1, pad_token_id=0, attn_logit_softcapping=None,
        final_logit_softcapping=None,
    )
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    with dev:
        model = Gemma3ForCausalLM(cfg).to(torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms (stored as w, multiplier 1 + w): small, non-zero
                p.copy_(torch.randn(p.shape, generator=g, device=dev) * 0.05)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    shutil.copy(args.tokenizer, os.path.join(out, "tokenizer.json"))
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B is zero at init, which would hide the adapter
                p.copy_(torch.randn(p.shape, generator=g, device=dev) * 0.02)
    peft_model.save_pretrained(os.path.join(out, "adapter"))
    log(f"wrote the Gemma-3-1B shape to {out} ({n_params / 1e6:.0f}M "
        f"parameters) and a random r 16 adapter to {out}/adapter")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face directory (bot export-hf, or --make-1b's)")
    ap.add_argument("--adapter", help="PEFT adapter directory")
    ap.add_argument("--ids", help="token ids from bot bench --dump-ids")
    ap.add_argument("--out", default="hf_reference.json")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", choices=["bf16", "f32"], help="default: bf16 on cuda, f32 on cpu")
    ap.add_argument("--latency-limit", type=int, default=20, help="messages for the batch-1 latencies")
    ap.add_argument("--generate", type=int, default=40, help="max new tokens of the original's method")
    ap.add_argument("--original-unmerged", action="store_true",
                    help="time the original's method with PEFT unmerged (as the original ran) instead of merged")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8,32,128")
    ap.add_argument("--skip", default="", help="comma list: original,fair,decode,throughput,agreement,train,bandwidth")
    ap.add_argument("--train-recipes", default="32:16:q_proj+k_proj+v_proj+o_proj:96",
                    help="space-separated R:ALPHA:TARGETS:SEQ_LEN (targets joined by +), one run each")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--train-warmup", type=int, default=3)
    ap.add_argument("--make-1b", metavar="DIR", help="write the Gemma-3-1B shape with random weights and adapter")
    ap.add_argument("--tokenizer", help="tokenizer.json for --make-1b (the 270M export's)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if args.make_1b:
        if not args.tokenizer:
            ap.error("--make-1b needs --tokenizer")
        make_1b(args)
        return
    if not (args.model and args.ids):
        ap.error("--model and --ids are needed (or --make-1b)")
    measure(args)


if __name__ == "__main__":
    main()
