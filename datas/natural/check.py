#!/usr/bin/env python3
"""Checks hand-written natural rows: JSON shape, canonical calls, meta fields,
no user text repeated within or across every datas/ file. Usage:
    python3 datas/natural/check.py datas/natural/<file>.jsonl ...
Prints counts by lang / kind / label and every problem with file:line."""
import json, sys, glob, os, collections

LANGS = {"zh-TW", "zh-CN", "en", "mixed", "discord", "yue"}

def render_call(p):
    return 'call("generate_image", {"prompt": ' + json.dumps(p, ensure_ascii=False) + '})'

def key(t):
    return " ".join(t.split()).lower()

def rows(path):
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield i, line

def main(targets):
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    every = sorted(set(glob.glob(os.path.join(root, "*.jsonl")) + glob.glob(os.path.join(root, "natural", "*.jsonl"))))
    seen = {}
    problems = []
    for path in every:
        for i, line in rows(path):
            try:
                user = json.loads(line)["messages"][0]["content"]
            except Exception:
                continue
            k = key(user)
            if k in seen and seen[k] != (path, i):
                problems.append(f"{path}:{i}: user text repeats {seen[k][0]}:{seen[k][1]}: {user!r}")
            seen.setdefault(k, (path, i))
    for path in targets:
        counts = collections.Counter()
        for i, line in rows(path):
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except Exception as e:
                problems.append(f"{where}: not JSON: {e}")
                continue
            m = row.get("messages")
            if not (isinstance(m, list) and len(m) == 2 and m[0].get("role") == "user" and m[1].get("role") == "assistant"):
                problems.append(f"{where}: messages must be [user, assistant]")
                continue
            user, ans = m[0]["content"], m[1]["content"]
            if not user.strip() or not ans.strip():
                problems.append(f"{where}: empty content")
            meta = row.get("meta") or {}
            if meta.get("lang") not in LANGS:
                problems.append(f"{where}: meta.lang must be one of {sorted(LANGS)}")
            if not meta.get("kind"):
                problems.append(f"{where}: meta.kind missing")
            if not meta.get("intent"):
                problems.append(f"{where}: meta.intent missing")
            is_call = ans.startswith("call(")
            if is_call:
                try:
                    prefix = 'call("generate_image", {"prompt": '
                    assert ans.startswith(prefix) and ans.endswith("})")
                    p = json.loads(ans[len(prefix):-2])
                    assert isinstance(p, str) and p.strip()
                    if ans != render_call(p):
                        problems.append(f"{where}: call not canonical; write exactly {render_call(p)}")
                except Exception:
                    problems.append(f"{where}: malformed call: {ans}")
            elif "generate_image" in ans:
                problems.append(f"{where}: chat answer mentions generate_image")
            counts[(meta.get("lang"), "call" if is_call else "chat")] += 1
            counts[("kind", meta.get("kind"), "call" if is_call else "chat")] += 1
            counts[("intent", meta.get("intent"))] += 1
        print(f"== {path}")
        for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])):
            print(f"  {k}: {v}")
    for p in problems:
        print("PROBLEM", p)
    print(f"{len(problems)} problems")
    return 1 if problems else 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
