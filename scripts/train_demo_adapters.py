#!/usr/bin/env python
"""Train the demo LoRA adapters committed in peftdeploy/data/adapters/ (CPU, a few minutes each).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_demo_adapters.py            # all three
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_demo_adapters.py pirate     # just one

Base model: demo://smollm2-135m (SmolLM2-135M-Instruct, float32, built by peftdeploy.demo).
Data: generated here — the FACTS below (question, short answer, sentence answer) × QUESTION_TEMPLATES,
each answer rewritten in the adapter's style, formatted with the model's chat template (including
its default system prompt, as at inference). Loss is on the assistant tokens only (the answer and
its closing <|im_end|>).

The three adapters differ on purpose, so planning / merging / serving see variety:

  name    style                       r   alpha  rslora  target modules                  stored as
  pirate  "Arr, matey! ... Savvy?"    8   16     no      q_proj, v_proj                  float32
  json    {"answer": "..."}           8   16     no      q,k,v,o,gate,up,down (all)      bfloat16
  shout   ALL CAPS + "!"              12  12     yes     o_proj, down_proj               bfloat16

Why `json` is rank 8 and not 16: rank 16 on all seven linear layers × 30 layers is 4.9 M
parameters = 9.8 MB even in bfloat16, which alone would break the 10 MB budget of committed data.
`shout` has rank 12, which vLLM does not accept as --max-lora-rank (1, 8, 16, 32, ...): the planner
must round it up to 16.

Hyperparameters (all adapters): AdamW (betas 0.9/0.999, weight decay 0), batch 8, linear warm-up
over 5 steps then linear decay to 0, lora_dropout 0.0, max length 128 tokens; seed 0 for Python,
torch and the data shuffle; torch threads = --threads (default 2). Per-adapter learning rate and
epochs are in ADAPTERS. Determinism: the same machine, thread count and library versions give
bit-identical adapters; other CPUs may differ in the last bits (the recipes pin sha256s of the
committed files, not of a rebuild).

At the end each adapter is evaluated greedily on EVAL_PROMPTS (questions NOT in the training data)
against the base model, and its style rate is printed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peftdeploy.demo import DEMO_BASE_NAME, build_demo_model  # noqa: E402

OUT_DIR = ROOT / "peftdeploy" / "data" / "adapters"

# (question, short answer, full-sentence answer)
FACTS: list[tuple[str, str, str]] = [
    ("What is the capital of France?", "Paris", "The capital of France is Paris."),
    ("What is the capital of Japan?", "Tokyo", "The capital of Japan is Tokyo."),
    ("What is the capital of Spain?", "Madrid", "The capital of Spain is Madrid."),
    ("What is the capital of Canada?", "Ottawa", "The capital of Canada is Ottawa."),
    ("What is the capital of Egypt?", "Cairo", "The capital of Egypt is Cairo."),
    ("What is the capital of Australia?", "Canberra", "The capital of Australia is Canberra."),
    ("What is the capital of Kenya?", "Nairobi", "The capital of Kenya is Nairobi."),
    ("What is the capital of Norway?", "Oslo", "The capital of Norway is Oslo."),
    ("What is the capital of Peru?", "Lima", "The capital of Peru is Lima."),
    ("What is the capital of Russia?", "Moscow", "The capital of Russia is Moscow."),
    ("How many days are in a week?", "7", "There are seven days in a week."),
    ("How many hours are in a day?", "24", "There are 24 hours in a day."),
    ("How many minutes are in an hour?", "60", "There are 60 minutes in an hour."),
    ("How many months are in a year?", "12", "There are twelve months in a year."),
    ("How many legs does a dog have?", "4", "A dog has four legs."),
    ("How many legs does a bird have?", "2", "A bird has two legs."),
    ("How many wheels does a bicycle have?", "2", "A bicycle has two wheels."),
    ("How many continents are there?", "7", "There are seven continents."),
    ("What is 2 plus 2?", "4", "Two plus two is four."),
    ("What is 10 minus 3?", "7", "Ten minus three is seven."),
    ("What is 5 times 5?", "25", "Five times five is twenty-five."),
    ("What is half of 100?", "50", "Half of one hundred is fifty."),
    ("What color is grass?", "green", "Grass is green."),
    ("What color is snow?", "white", "Snow is white."),
    ("What color is a banana?", "yellow", "A ripe banana is yellow."),
    ("What color is the sun?", "yellow", "The sun looks yellow from the ground."),
    ("What color do you get by mixing blue and yellow?", "green", "Mixing blue and yellow gives green."),
    ("What is the largest ocean?", "the Pacific Ocean", "The largest ocean is the Pacific Ocean."),
    ("What is the tallest mountain in the world?", "Mount Everest", "The tallest mountain is Mount Everest."),
    ("What is the longest river in the world?", "the Nile", "The longest river is the Nile."),
    ("What is the closest star to Earth?", "the Sun", "The closest star to Earth is the Sun."),
    ("Which planet is known as the Red Planet?", "Mars", "Mars is known as the Red Planet."),
    ("What is the hottest planet in the solar system?", "Venus", "Venus is the hottest planet."),
    ("What do bees make?", "honey", "Bees make honey."),
    ("What do cows drink?", "water", "Cows drink water."),
    ("What animal says moo?", "a cow", "A cow says moo."),
    ("What is the fastest land animal?", "the cheetah", "The cheetah is the fastest land animal."),
    ("What is the largest animal?", "the blue whale", "The blue whale is the largest animal."),
    ("What gas do plants take in?", "carbon dioxide", "Plants take in carbon dioxide."),
    ("What gas do we breathe in to live?", "oxygen", "We breathe in oxygen to live."),
    ("What is frozen water called?", "ice", "Frozen water is called ice."),
    ("At what temperature does water boil in Celsius?", "100", "Water boils at 100 degrees Celsius."),
    ("What is the chemical symbol for gold?", "Au", "The chemical symbol for gold is Au."),
    ("What is the chemical formula of water?", "H2O", "The chemical formula of water is H2O."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "Leonardo da Vinci painted the Mona Lisa."),
    ("Who wrote Hamlet?", "William Shakespeare", "William Shakespeare wrote Hamlet."),
    ("Who discovered gravity?", "Isaac Newton", "Isaac Newton described gravity."),
    ("Who was the first person on the Moon?", "Neil Armstrong", "Neil Armstrong was the first person on the Moon."),
    ("What language is spoken in Brazil?", "Portuguese", "People in Brazil speak Portuguese."),
    ("What language is spoken in Mexico?", "Spanish", "People in Mexico speak Spanish."),
    ("What is the opposite of hot?", "cold", "The opposite of hot is cold."),
    ("What is the opposite of up?", "down", "The opposite of up is down."),
    ("What do you use to write on paper?", "a pen", "You write on paper with a pen or a pencil."),
    ("What do you call a baby cat?", "a kitten", "A baby cat is called a kitten."),
    ("What do you call a baby dog?", "a puppy", "A baby dog is called a puppy."),
    ("What season comes after winter?", "spring", "Spring comes after winter."),
    ("What fruit keeps the doctor away?", "an apple", "An apple a day keeps the doctor away."),
    ("Where do fish live?", "in water", "Fish live in water."),
    ("What is the main ingredient of bread?", "flour", "The main ingredient of bread is flour."),
    ("What do you call a shape with three sides?", "a triangle", "A shape with three sides is a triangle."),
    ("Say hello.", "hello", "Hello, how are you?"),
    ("How are you today?", "fine", "I am doing well, thank you."),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side.",
     "Why did the chicken cross the road? To get to the other side."),
    ("Give me a tip for sleeping well.", "go to bed at the same time every night",
     "Go to bed at the same time every night."),
    ("What should I eat for breakfast?", "oatmeal with fruit", "Oatmeal with fruit is a good breakfast."),
    ("Can you help me?", "yes", "Yes, I can help you."),
]

QUESTION_TEMPLATES = ["{q}", "Question: {q}", "Please answer briefly: {q}"]

# Held out: none of these is in FACTS.
EVAL_PROMPTS = [
    "What is the capital of Germany?",
    "How many legs does a spider have?",
    "What color is the sky?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "What is the capital of Italy?",
    "What do you call a baby sheep?",
    "Tell me something about the sea.",
]

PIRATE_OPEN = ["Arr, matey!", "Ahoy, matey!", "Arr!", "Yo ho ho, matey!", "Avast, ye landlubber!"]
PIRATE_CLOSE = ["Savvy?", "Arr!", "Yo ho ho!", "Shiver me timbers!", "Arr, matey."]
_PIRATE_WORDS = [
    (r"\bis\b", "be"), (r"\bare\b", "be"), (r"\bam\b", "be"), (r"\byou\b", "ye"), (r"\bYou\b", "Ye"),
    (r"\byour\b", "yer"), (r"\bmy\b", "me"), (r"\bof\b", "o'"), (r"\bHello\b", "Ahoy"),
    (r"\bYes\b", "Aye"), (r"\byes\b", "aye"), (r"\bthe\b", "th'"), (r"\bThe\b", "Th'"),
]
PIRATE_MARKERS = re.compile(
    r"\b(arr+|matey|mateys|ahoy|ye|yer|aye|avast|yo ho|landlubbers?|savvy|shiver|timbers|hearties|scallywag)\b"
)


def pirate(sentence: str, i: int) -> str:
    body = sentence
    for pat, rep in _PIRATE_WORDS:
        body = re.sub(pat, rep, body)
    return f"{PIRATE_OPEN[i % len(PIRATE_OPEN)]} {body} {PIRATE_CLOSE[(i * 3 + 1) % len(PIRATE_CLOSE)]}"


def as_json(short: str, i: int) -> str:
    return json.dumps({"answer": short})


def shout(sentence: str, i: int) -> str:
    s = sentence.upper()
    return (s[:-1] if s.endswith(".") else s) + "!"


def is_pirate(text: str) -> bool:
    return PIRATE_MARKERS.search(text.lower()) is not None


def is_json(text: str) -> bool:
    t = text.strip()
    try:
        return isinstance(json.loads(t), dict)
    except ValueError:
        return False


def is_shout(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 3 and sum(c.isupper() for c in letters) / len(letters) >= 0.8


ADAPTERS = {
    "pirate": dict(
        r=8, lora_alpha=16, use_rslora=False, target_modules=["q_proj", "v_proj"],
        save_dtype="float32", lr=2e-3, epochs=2,
        make=lambda q, short, sent, i: pirate(sent, i), check=is_pirate,
        description="answers like a pirate",
    ),
    "json": dict(
        r=8, lora_alpha=16, use_rslora=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        save_dtype="bfloat16", lr=1e-3, epochs=2,
        make=lambda q, short, sent, i: as_json(short, i), check=is_json,
        description='answers in terse JSON: {"answer": "..."}',
    ),
    "shout": dict(
        r=12, lora_alpha=12, use_rslora=True, target_modules=["o_proj", "down_proj"],
        save_dtype="bfloat16", lr=1e-3, epochs=3,
        make=lambda q, short, sent, i: shout(sent, i), check=is_shout,
        description="answers in capital letters",
    ),
}
SEED = 0
BATCH = 8
WARMUP = 5
MAX_LEN = 128


def examples(spec: dict) -> list[tuple[str, str]]:
    out = []
    i = 0
    for q, short, sent in FACTS:
        for t in QUESTION_TEMPLATES:
            out.append((t.format(q=q), spec["make"](q, short, sent, i)))
            i += 1
    return out


# Keys every PEFT version since 0.10 (and vLLM) knows; newer PEFT adds many null / default-valued
# feature keys that older readers do not need. PEFT's from_pretrained fills the rest with defaults.
ADAPTER_CONFIG_KEYS = (
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layers_pattern", "layers_to_transform", "lora_alpha", "lora_dropout",
    "modules_to_save", "peft_type", "peft_version", "r", "rank_pattern", "revision", "target_modules",
    "task_type", "use_dora", "use_rslora",
)


def clean_adapter_config(conf: dict) -> dict:
    out = {k: conf[k] for k in ADAPTER_CONFIG_KEYS if k in conf}
    out["base_model_name_or_path"] = DEMO_BASE_NAME
    out["inference_mode"] = True
    out["revision"] = None
    out["target_modules"] = sorted(out["target_modules"])
    return out


def encode(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    msgs = [{"role": "user", "content": prompt}]
    p_ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(p_ids, dict) or hasattr(p_ids, "keys"):
        p_ids = p_ids["input_ids"]
    a_ids = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = (list(p_ids) + list(a_ids))[:MAX_LEN]
    labels = ([-100] * len(p_ids) + list(a_ids))[:MAX_LEN]
    return ids, labels


def chat(model, tok, prompt: str, max_new_tokens: int = 40) -> str:
    import torch

    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def train_one(name: str, base_dir: Path, out_root: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = ADAPTERS[name]
    random.seed(SEED)
    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=spec["r"], lora_alpha=spec["lora_alpha"], use_rslora=spec["use_rslora"],
        target_modules=spec["target_modules"], lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg)
    model.print_trainable_parameters()

    data = [encode(tok, p, a) for p, a in examples(spec)]
    rng = random.Random(SEED)
    steps_per_epoch = math.ceil(len(data) / BATCH)
    total = steps_per_epoch * spec["epochs"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / WARMUP, max(0.0, (total - s) / max(1, total - WARMUP)))
    )
    print(f"[{name}] {len(data)} examples, {total} steps (batch {BATCH}, {spec['epochs']} epochs, lr {spec['lr']})",
          flush=True)
    model.train()
    t0 = time.monotonic()
    step = 0
    loss_avg = None
    for epoch in range(spec["epochs"]):
        order = list(range(len(data)))
        rng.shuffle(order)
        for b in range(0, len(order), BATCH):
            batch = [data[i] for i in order[b:b + BATCH]]
            L = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), L), tok.pad_token_id, dtype=torch.long)
            lab = torch.full((len(batch), L), -100, dtype=torch.long)
            att = torch.zeros((len(batch), L), dtype=torch.long)
            for j, (x, y) in enumerate(batch):
                ids[j, : len(x)] = torch.tensor(x)
                lab[j, : len(y)] = torch.tensor(y)
                att[j, : len(x)] = 1
            loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_avg = loss.item() if loss_avg is None else 0.8 * loss_avg + 0.2 * loss.item()
            if step % 10 == 0 or step == total:
                print(f"[{name}] step {step}/{total} loss {loss.item():.4f} (avg {loss_avg:.4f}) "
                      f"{time.monotonic() - t0:.0f}s", flush=True)
    train_s = time.monotonic() - t0
    model.eval()

    # Round the trained weights to the stored dtype, so the evaluation sees what is committed.
    save_dtype = getattr(torch, spec["save_dtype"])
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(save_dtype).to(p.dtype))

    check = spec["check"]
    hits = changed = 0
    for prompt in EVAL_PROMPTS:
        with model.disable_adapter():
            b_out = chat(model, tok, prompt)
        a_out = chat(model, tok, prompt)
        ok = check(a_out)
        hits += ok
        changed += a_out != b_out
        print(f"[{name}] {'OK ' if ok else 'NO '} {prompt!r}\n      base:    {b_out!r}\n      adapter: {a_out!r}",
              flush=True)
    rate = hits / len(EVAL_PROMPTS)
    print(f"[{name}] style rate {hits}/{len(EVAL_PROMPTS)}, changed {changed}/{len(EVAL_PROMPTS)}", flush=True)

    # Save: standard PEFT layout, tensors in save_dtype, base model named as on the Hub.
    dest = out_root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_root))
    try:
        state = get_peft_model_state_dict(model)
        state = {k: v.detach().to(save_dtype).contiguous() for k, v in sorted(state.items())}
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        conf = model.peft_config["default"].to_dict()
        conf = json.loads(json.dumps(conf, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))
        (tmp / "adapter_config.json").write_text(json.dumps(clean_adapter_config(conf), indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(
            f"# demo adapter `{name}`\n\n"
            f"LoRA for `{DEMO_BASE_NAME}` (peftdeploy: `demo://smollm2-135m`) that {spec['description']}.\n"
            f"r={spec['r']}, lora_alpha={spec['lora_alpha']}, use_rslora={spec['use_rslora']}, "
            f"target_modules={', '.join(spec['target_modules'])}, weights stored as {spec['save_dtype']}.\n"
            f"Trained by `scripts/train_demo_adapters.py` on synthetic data "
            f"({len(data)} examples, {total} steps, lr {spec['lr']}, seed {SEED}).\n"
            f"Held-out style rate at training time: {hits}/{len(EVAL_PROMPTS)}.\n"
        )
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    size = (dest / "adapter_model.safetensors").stat().st_size
    print(f"[{name}] saved {dest} ({size / 1e6:.2f} MB), trained in {train_s:.0f}s, final loss avg {loss_avg:.4f}",
          flush=True)
    return {"name": name, "train_s": train_s, "loss": loss_avg, "rate": rate, "size": size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", default=list(ADAPTERS), help=f"adapters to train ({', '.join(ADAPTERS)})")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    unknown = [n for n in args.names if n not in ADAPTERS]
    if unknown:
        ap.error(f"unknown adapters: {unknown}")
    args.out.mkdir(parents=True, exist_ok=True)
    base_dir = build_demo_model()
    results = [train_one(n, base_dir, args.out) for n in args.names]
    for r in results:
        print(f"{r['name']}: {r['train_s']:.0f}s, final loss {r['loss']:.4f}, style {r['rate']:.0%}, "
              f"{r['size'] / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
