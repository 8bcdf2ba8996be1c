"""Generate the embedded default assets under ``sarkd_diag/assets/``.

Everything ``sarkd-diag`` needs to run with no hub access is built here from
nothing but code, deterministically (fixed seeds, one thread), so running the
script twice writes byte-identical files:

* ``corpus/train.txt`` and ``corpus/validation.txt`` -- two-speaker dialogues
  ("A: ... B: ...", one per line) from a small grammar with consistent facts
  (the sea is blue, a cow says moo, paris is in france, three plus four is
  seven), so a tiny model has real structure to learn;
* tokenizer 1 -- byte-level BPE, vocab 512, eos ``<|endoftext|>``, no pad;
* tokenizer 2 -- a different vocabulary (Metaspace BPE, vocab 384), for the
  dual-tokenizer student;
* ``tiny-mixtral`` -- the MoE teacher (Mixtral, 4 experts, top-2), pretrained
  here on the train corpus;
* ``tiny-gpt2`` / ``tiny-gpt2-dual`` -- untrained GPT-2 students (tokenizer 1 /
  tokenizer 2), random init with a fixed seed;
* ``manifest.json`` -- what was built, with the measured validation perplexities.

Run:  python scripts/make_assets.py [--out DIR] [--time-steps]
"""

from __future__ import annotations

import os

# Before tokenizers/torch are imported: single-threaded and reproducible.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging  # noqa: E402

SEED = 1234
EOS = "<|endoftext|>"
UNK = "<unk>"
N_DIALOGUES = 1800
VALIDATION_FRACTION = 0.05

# --------------------------------------------------------------------------------------------------
# 1. The dialogue grammar. Facts are fixed tables, so every answer is consistent with every other.
# --------------------------------------------------------------------------------------------------

COLOUR_THINGS = {
    "blue": ["sea", "sky", "ocean"],
    "green": ["grass", "frog", "forest"],
    "red": ["apple", "rose", "tomato"],
    "yellow": ["sun", "banana", "lemon"],
    "white": ["snow", "cloud", "milk"],
    "black": ["night", "coal", "crow"],
    "orange": ["carrot", "pumpkin", "sunset"],
    "purple": ["grape", "plum", "violet"],
    "brown": ["chocolate", "bear", "soil"],
    "pink": ["flamingo", "blossom", "candy"],
}
# animal: (sound, food, home)
ANIMALS = {
    "cat": ("meow", "fish", "house"),
    "dog": ("woof", "bones", "kennel"),
    "cow": ("moo", "grass", "barn"),
    "duck": ("quack", "bread", "pond"),
    "sheep": ("baa", "grass", "field"),
    "horse": ("neigh", "hay", "stable"),
    "owl": ("hoot", "mice", "tree"),
    "frog": ("croak", "flies", "pond"),
    "lion": ("roar", "meat", "savanna"),
    "bee": ("buzz", "nectar", "hive"),
    "mouse": ("squeak", "cheese", "hole"),
    "pig": ("oink", "apples", "farm"),
}
CITIES = {
    "paris": "france", "london": "england", "rome": "italy", "tokyo": "japan",
    "cairo": "egypt", "berlin": "germany", "madrid": "spain", "lisbon": "portugal",
    "oslo": "norway", "dublin": "ireland", "athens": "greece", "vienna": "austria",
    "ottawa": "canada", "lima": "peru", "nairobi": "kenya", "seoul": "korea",
}
CITY_TRAITS = {
    "paris": "beautiful", "london": "rainy", "rome": "old", "tokyo": "busy", "cairo": "hot",
    "berlin": "green", "madrid": "sunny", "lisbon": "hilly", "oslo": "cold", "dublin": "friendly",
    "athens": "ancient", "vienna": "elegant", "ottawa": "quiet", "lima": "foggy", "nairobi": "lively",
    "seoul": "modern",
}
WEATHER_ITEMS = {
    "rainy": "umbrella", "sunny": "sunglasses", "snowy": "boots", "windy": "jacket",
    "cold": "scarf", "hot": "water bottle",
}
ACTIVITY_PLACES = {
    "swim": "pool", "read": "library", "play football": "park", "paint": "studio",
    "cook": "kitchen", "dance": "club", "run": "track", "fish": "river", "ski": "mountain",
    "study": "school", "sing": "choir", "climb": "gym",
}
FOODS = ["pasta", "soup", "rice", "pizza", "salad", "eggs", "toast", "noodles", "curry", "porridge",
         "pancakes", "fish"]
GOOD_TASTES = ["delicious", "tasty", "great", "lovely", "very good"]
BAD_TASTES = ["salty", "cold", "spicy", "dry", "sweet"]
MEALS = ["breakfast", "lunch", "dinner"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
           "nineteen", "twenty"]
NAMES = ["anna", "ben", "clara", "david", "emma", "felix", "grace", "henry", "iris", "jack", "kate",
         "leo", "mia", "noah", "olga", "paul", "rosa", "sam", "tina", "victor", "wendy", "yusuf",
         "zoe", "omar", "lucy", "ivan", "nina", "tom"]
MOODS = ["fine", "good", "great", "tired", "happy", "okay", "busy"]
GREETINGS = ["hi", "hello", "hey", "good morning", "good evening", "hi there"]
FAREWELLS = [("ok , see you later .", "bye !"), ("i have to go now .", "ok , goodbye !"),
             ("thanks for the chat .", "you are welcome , bye ."), ("talk to you soon .", "see you !")]


def _colour(r: random.Random) -> list[str]:
    c = r.choice(list(COLOUR_THINGS))
    thing = r.choice(COLOUR_THINGS[c])
    q = r.choice(["what is your favourite colour ?", "which colour do you like best ?",
                  "do you have a favourite colour ?"])
    a = r.choice([f"my favourite colour is {c} .", f"i like {c} best .", f"{c} , i think ."])
    why = r.choice([f"why {c} ?", f"why do you like {c} ?"])
    because = r.choice([f"because the {thing} is {c} .", f"because {c} reminds me of the {thing} ."])
    turns = [q, a, why, because]
    if r.random() < 0.5:
        other = r.choice([t for t in COLOUR_THINGS[c] if t != thing])
        turns += [f"what else is {c} ?", f"the {other} is {c} too ."]
    elif r.random() < 0.5:
        c2 = r.choice([x for x in COLOUR_THINGS if x != c])
        turns += [f"i prefer {c2} .", f"{c2} is nice too , like the {r.choice(COLOUR_THINGS[c2])} ."]
    return turns


def _thing_colour(r: random.Random) -> list[str]:
    c = r.choice(list(COLOUR_THINGS))
    thing = r.choice(COLOUR_THINGS[c])
    turns = [f"what colour is the {thing} ?", f"the {thing} is {c} ."]
    if r.random() < 0.5:
        wrong = r.choice([x for x in COLOUR_THINGS if x != c])
        turns += [f"is it not {wrong} ?", f"no , the {thing} is {c} , not {wrong} ."]
    return turns


def _pet(r: random.Random) -> list[str]:
    animal = r.choice(list(ANIMALS))
    sound, food, home = ANIMALS[animal]
    turns = [r.choice(["do you have a pet ?", "do you have any animals ?"]),
             r.choice([f"yes , i have a {animal} .", f"yes , a {animal} ."])]
    follow = [
        [f"what does your {animal} say ?", f"my {animal} says {sound} ."],
        [f"what does your {animal} eat ?", f"my {animal} eats {food} ."],
        [f"where does your {animal} sleep ?", f"it sleeps in the {home} ."],
    ]
    r.shuffle(follow)
    for pair in follow[: r.randint(1, 3)]:
        turns += pair
    return turns


def _animal_fact(r: random.Random) -> list[str]:
    animal = r.choice(list(ANIMALS))
    sound, food, home = ANIMALS[animal]
    return r.choice([
        [f"what does a {animal} say ?", f"a {animal} says {sound} ."],
        [f"what do {animal}s eat ?" if animal not in ("sheep", "mouse") else f"what does a {animal} eat ?",
         f"a {animal} eats {food} ."],
        [f"where does a {animal} live ?", f"a {animal} lives in the {home} ."],
        [f"which animal says {sound} ?", f"the {animal} says {sound} ."],
    ])


def _home(r: random.Random) -> list[str]:
    city = r.choice(list(CITIES))
    country = CITIES[city]
    turns = [r.choice(["where are you from ?", "where do you live ?"]),
             r.choice([f"i am from {city} .", f"i live in {city} ."])]
    roll = r.random()
    if roll < 0.35:
        turns += [f"is {city} in {country} ?", f"yes , {city} is in {country} ."]
    elif roll < 0.7:
        wrong = r.choice([x for x in CITIES.values() if x != country])
        turns += [f"is {city} in {wrong} ?", f"no , {city} is in {country} , not {wrong} ."]
    else:
        turns += [f"which country is {city} in ?", f"{city} is in {country} ."]
    if r.random() < 0.6:
        turns += [f"what is {city} like ?", f"{city} is very {CITY_TRAITS[city]} ."]
    return turns


def _weather(r: random.Random) -> list[str]:
    w = r.choice(list(WEATHER_ITEMS))
    item = WEATHER_ITEMS[w]
    place = r.choice(["today", "outside", f"in {r.choice(list(CITIES))}"])
    turns = [f"how is the weather {place} ?", f"it is {w} {place} ."]
    if r.random() < 0.7:
        turns += [r.choice([f"should i take my {item} ?", f"do i need my {item} ?"]),
                  f"yes , take your {item} , it is {w} ."]
    return turns


def _maths(r: random.Random) -> list[str]:
    if r.random() < 0.6:
        a = r.randint(0, 10)
        b = r.randint(0, 10)
        sa, sb, s = NUMBERS[a], NUMBERS[b], NUMBERS[a + b]
        turns = [f"what is {sa} plus {sb} ?", f"{sa} plus {sb} is {s} ."]
        if r.random() < 0.4:
            turns += [f"and {sb} plus {sa} ?", f"{sb} plus {sa} is also {s} ."]
    else:
        a = r.randint(0, 20)
        b = r.randint(0, a)
        sa, sb, s = NUMBERS[a], NUMBERS[b], NUMBERS[a - b]
        turns = [f"what is {sa} minus {sb} ?", f"{sa} minus {sb} is {s} ."]
    return turns


def _days(r: random.Random) -> list[str]:
    i = r.randrange(7)
    today, tomorrow, yesterday = DAYS[i], DAYS[(i + 1) % 7], DAYS[(i - 1) % 7]
    turns = ["what day is it today ?", f"today is {today} ."]
    roll = r.random()
    if roll < 0.4:
        turns += [f"so tomorrow is {tomorrow} ?", f"yes , tomorrow is {tomorrow} ."]
    elif roll < 0.7:
        wrong = r.choice([d for d in DAYS if d not in (today, tomorrow)])
        turns += [f"so tomorrow is {wrong} ?", f"no , tomorrow is {tomorrow} ."]
    else:
        turns += ["and yesterday ?", f"yesterday was {yesterday} ."]
    return turns


def _meal(r: random.Random) -> list[str]:
    meal, food = r.choice(MEALS), r.choice(FOODS)
    turns = [f"what did you have for {meal} ?", f"i had {food} for {meal} ."]
    if r.random() < 0.5:
        turns += [f"was the {food} good ?", f"yes , the {food} was {r.choice(GOOD_TASTES)} ."]
    else:
        turns += [f"did you like the {food} ?", f"not really , the {food} was too {r.choice(BAD_TASTES)} ."]
    return turns


def _hobby(r: random.Random) -> list[str]:
    act = r.choice(list(ACTIVITY_PLACES))
    place = ACTIVITY_PLACES[act]
    day = r.choice(DAYS)
    turns = [r.choice(["what do you like to do ?", "what is your hobby ?", f"what do you do on {day} ?"]),
             r.choice([f"i like to {act} .", f"i {act} every {day} ."])]
    if r.random() < 0.7:
        turns += [f"where do you {act} ?", f"i {act} at the {place} ."]
    return turns


SEGMENTS = [_colour, _thing_colour, _pet, _animal_fact, _home, _weather, _maths, _days, _meal, _hobby]


def make_dialogue(r: random.Random) -> str:
    """One dialogue: optional greeting, 1-3 topic segments, optional farewell, speakers alternating."""
    turns: list[list[str]] = []  # [speaker, text]

    def add(segment: list[str], asker: str) -> None:
        other = "B" if asker == "A" else "A"
        for k, text in enumerate(segment):
            speaker = asker if k % 2 == 0 else other
            if turns and turns[-1][0] == speaker:
                turns[-1][1] += " " + text  # the answer and the next question share a turn
            else:
                turns.append([speaker, text])

    roll = r.random()
    if roll < 0.35:
        n1, n2 = r.sample(NAMES, 2)
        add([f"{r.choice(GREETINGS)} , i am {n1} .", f"hi {n1} , i am {n2} . nice to meet you .",
             f"nice to meet you too , {n2} ."], "A")
    elif roll < 0.65:
        m1, m2 = r.choice(MOODS), r.choice(MOODS)
        add([f"{r.choice(GREETINGS)} , how are you ?", f"i am {m1} , thanks . and you ?",
             f"i am {m2} too ." if m1 == m2 else f"i am {m2} ."], "A")
    elif roll < 0.8:
        add([f"{r.choice(GREETINGS)} !", f"{r.choice(GREETINGS)} !"], "A")
    for _ in range(r.choice([1, 1, 2, 2, 2, 3])):
        add(r.choice(SEGMENTS)(r), r.choice("AB") if turns else "A")
    if r.random() < 0.4:
        bye, reply = r.choice(FAREWELLS)
        add([bye, reply], "B" if turns[-1][0] == "A" else "A")
    return " ".join(f"{s}: {t}" for s, t in turns)


def make_corpus(seed: int) -> tuple[list[str], list[str]]:
    r = random.Random(seed)
    seen: set[str] = set()
    dialogues = []
    while len(dialogues) < N_DIALOGUES:
        d = make_dialogue(r)
        if d not in seen:  # distinct lines, so no validation dialogue appears in train
            seen.add(d)
            dialogues.append(d)
    r.shuffle(dialogues)
    n_val = int(len(dialogues) * VALIDATION_FRACTION)
    return dialogues[n_val:], dialogues[:n_val]


# --------------------------------------------------------------------------------------------------
# 2. Tokenizers.
# --------------------------------------------------------------------------------------------------


def train_bytelevel_bpe(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, model_max_length=256)


def train_metaspace_bpe(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[UNK, EOS], show_progress=False,
        initial_alphabet=[chr(i) for i in range(33, 127)],  # any printable ASCII, never <unk>
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=UNK,
                                   model_max_length=256)


# --------------------------------------------------------------------------------------------------
# 3. Models.
# --------------------------------------------------------------------------------------------------


def token_stream(tokenizer: PreTrainedTokenizerFast, lines: list[str]) -> torch.Tensor:
    """Each dialogue followed by eos, all concatenated: what the training core feeds the models."""
    ids: list[int] = []
    for enc in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model: torch.nn.Module, stream: torch.Tensor, block: int = 128) -> float:
    model.eval()
    n = (len(stream) // block) * block
    blocks = stream[:n].view(-1, block)
    total, count = 0.0, 0
    for i in range(0, len(blocks), 32):
        x = blocks[i: i + 32]
        logits = model(input_ids=x).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                               reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def make_teacher(vocab_size: int, eos_id: int) -> MixtralForCausalLM:
    cfg = MixtralConfig(
        vocab_size=vocab_size, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None,
        tie_word_embeddings=False, output_router_logits=True, use_cache=True,
    )
    torch.manual_seed(SEED)
    return MixtralForCausalLM(cfg)


def make_student(vocab_size: int, eos_id: int, seed: int) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def pretrain_teacher(model: MixtralForCausalLM, train: torch.Tensor, val: torch.Tensor, steps: int,
                     batch: int = 16, block: int = 128, lr: float = 3e-3) -> None:
    """Plain next-token CE (+ Mixtral's own load-balancing aux loss), AdamW, fp32, cosine schedule."""
    g = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    t0 = time.perf_counter()
    for step in range(steps):
        model.train()
        starts = torch.randint(0, len(train) - block - 1, (batch,), generator=g)
        x = torch.stack([train[s: s + block] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(input_ids=x, labels=x)  # loss = CE + router_aux_loss_coef * load-balance
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"  teacher step {step + 1:4d}/{steps}  loss {out.loss.item():.3f}  "
                  f"val ppl {perplexity(model, val):.2f}  ({time.perf_counter() - t0:.0f}s)", flush=True)


def time_steps(student: torch.nn.Module, teacher: torch.nn.Module, vocab: int, dtype: torch.dtype,
               steps: int, batch: int = 8, block: int = 64) -> float:
    """Seconds for `steps` forward+backward passes of student and teacher (the router path) in `dtype`."""
    import copy

    s = copy.deepcopy(student).to(dtype).train()
    t = copy.deepcopy(teacher).to(dtype).train()
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = torch.randint(0, vocab, (batch, block), generator=g)
        ls = s(input_ids=x).logits
        lt = t(input_ids=x).logits
        loss = F.kl_div(F.log_softmax(ls.float() / 2, -1), F.log_softmax(lt.float() / 2, -1),
                        log_target=True, reduction="batchmean")
        loss.backward()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sarkd_diag" / "assets")
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--time-steps", action="store_true",
                    help="also time 30 student+teacher fwd/bwd steps in fp32 and fp16 (batch 8 x 64)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    out: Path = args.out
    for sub in ("corpus", "tiny-mixtral", "tiny-gpt2", "tiny-gpt2-dual"):
        shutil.rmtree(out / sub, ignore_errors=True)

    # 1. corpus
    train_lines, val_lines = make_corpus(SEED)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "corpus" / "train.txt").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    (out / "corpus" / "validation.txt").write_text("\n".join(val_lines) + "\n", encoding="utf-8")
    print(f"corpus: {len(train_lines)} train / {len(val_lines)} validation dialogues, "
          f"{(out / 'corpus' / 'train.txt').stat().st_size / 1024:.0f} KB train")

    # 2. tokenizers
    tok1 = train_bytelevel_bpe(train_lines, 512)
    tok2 = train_metaspace_bpe(train_lines, 384)
    print(f"tokenizers: byte-level BPE {len(tok1)} / Metaspace BPE {len(tok2)}")

    train1, val1 = token_stream(tok1, train_lines), token_stream(tok1, val_lines)
    val2 = token_stream(tok2, val_lines)

    # 3. models
    teacher = make_teacher(len(tok1), tok1.eos_token_id)
    student = make_student(len(tok1), tok1.eos_token_id, SEED + 1)
    dual = make_student(len(tok2), tok2.eos_token_id, SEED + 2)
    student_ppl = perplexity(student, val1)
    dual_ppl = perplexity(dual, val2)
    print(f"untrained student val ppl {student_ppl:.2f}, dual student {dual_ppl:.2f}")
    print(f"pretraining teacher ({n_params(teacher):,} params) for {args.teacher_steps} steps")
    pretrain_teacher(teacher, train1, val1, args.teacher_steps)
    teacher_ppl = perplexity(teacher, val1)
    if not teacher_ppl <= student_ppl / 2:
        raise SystemExit(f"teacher val ppl {teacher_ppl:.2f} is not at most half the student's {student_ppl:.2f}")

    teacher.config.output_router_logits = False
    for name, model, tok in (("tiny-mixtral", teacher, tok1), ("tiny-gpt2", student, tok1),
                             ("tiny-gpt2-dual", dual, tok2)):
        model.eval()
        model.save_pretrained(out / name, safe_serialization=True)
        tok.save_pretrained(out / name)
        # The generic class name, so transformers 4.x (which has no TokenizersBackend) loads it too.
        cfg_path = out / name / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    manifest = {
        "generator": "scripts/make_assets.py",
        "seed": SEED,
        "corpus": {"train_dialogues": len(train_lines), "validation_dialogues": len(val_lines),
                   "validation_tokens_tok1": len(val1)},
        "models": {
            "tiny-mixtral": {"params": n_params(teacher), "vocab_size": len(tok1),
                             "val_ppl": round(teacher_ppl, 3), "trained": True},
            "tiny-gpt2": {"params": n_params(student), "vocab_size": len(tok1),
                          "val_ppl": round(student_ppl, 3), "trained": False},
            "tiny-gpt2-dual": {"params": n_params(dual), "vocab_size": len(tok2),
                               "val_ppl": round(dual_ppl, 3), "trained": False},
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    print(f"teacher val ppl {teacher_ppl:.2f} | untrained student {student_ppl:.2f} | dual {dual_ppl:.2f}")
    print(f"params: teacher {n_params(teacher):,}  student {n_params(student):,}  dual {n_params(dual):,}")
    files = sorted(p for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    total = sum(p.stat().st_size for p in files)
    print(f"assets: {len(files)} files, {total / 1024:.0f} KB; generated in {time.perf_counter() - t_start:.0f}s")
    digest = hashlib.sha256()
    for p in files:
        if p.suffix != ".py":
            digest.update(p.relative_to(out).as_posix().encode() + p.read_bytes())
    print(f"sha256 of all generated files: {digest.hexdigest()}")

    if args.time_steps:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            secs = time_steps(student, teacher, len(tok1), dtype, 30)
            print(f"30 fwd+bwd steps (student+teacher, batch 8 x 64) in {dtype}: {secs:.1f}s")


if __name__ == "__main__":
    main()
