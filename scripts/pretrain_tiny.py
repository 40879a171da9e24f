"""Pretrain an embedded Llama (GQA) on the generated world's text.

    python scripts/make_tiny_assets.py && python scripts/pretrain_tiny.py    # ~22 minutes on 2 CPU cores
    python scripts/pretrain_tiny.py --corpus world --steps 1000             # models/world-llama, stage 1
    python scripts/pretrain_tiny.py --corpus world --questions --init_from models/world-llama \
        --text_seed 8 --steps 700 --lr 1e-3 --threads 1                     # stage 2: questions

``--corpus plain`` (the default) makes ``models/tiny-llama``, the model of the fast tests: one
register of plain sentences. ``--corpus world`` makes ``models/world-llama``, the model of the
accuracy study (``benchmarks/quality.py``): the same world's facts in many phrasings and several
question-and-answer layouts (``tiny_world.world_text``), so its fine-tuning starts where a real
LLM's does, knowing the facts and meeting only a new layout. A generated corpus is far more
regular than real text, and a model trained on it alone becomes confidently wrong on anything
off its templates (the first model put 14-18 nats on ordinary words of a response); the world
model is pretrained with label smoothing 0.1, which keeps a floor under every token's probability.
After the first stage it completes statements ("The camel lives in the desert") but answers a
question about any entity with one canned entity ("The color of the dolphin is brown"): it has not
learnt to carry the entity from the question into the answer. A second stage on new text with
more than half quizzes and instructions (``--questions``) teaches that; its log keeps the first
stage's under ``init_from``.

``--pointing_rows K`` adds K look-up questions (``tiny_world.pointing_question``: four numbered
options, then the number of the one that holds a value) to every step, one per row, with their
own loss on the answer digit alone, summed with the text's loss (``--batch 0``: look-ups alone).
Drills inside the text at lr 1e-3 and 3e-3 never formed the pointing; look-up rows at lr 3e-4 do
(docs/quality.md). ``--probe_every N`` reads ``check_base.pointing_probe`` into the log as it
goes.

Writes ``models/tiny-llama/`` (config, fp32 safetensors weights, generation config) next to the
tokenizer ``make_tiny_assets.py`` wrote, and ``pretrain_log.json`` (the loss curve and the time it
took). Every seed is fixed and the thread count too, so the same machine type remakes the same
weights; the text is ``scripts/tiny_world.py``'s plain sentences about a world of animals and
plants and the arithmetic of numbers up to 20, packed into sequences of 128 tokens. Generated
rather than real English: the evaluation tasks ask about that world's facts, so the pretrained
model can know them while never having seen a task's layout, and nothing has to be downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from tiny_world import (  # noqa: E402
    ATTRIBUTES,
    POINTING_MIX,
    QUESTION_MIX,
    STATEMENT_MIX,
    _drill,
    make_world,
    pointing_question,
    pretraining_text,
    world_text,
)

from smt_dist.recipes.data import collate  # noqa: E402
from smt_dist.recipes.formats import IGNORE_INDEX  # noqa: E402

MODEL_DIRS = {"plain": ROOT / "models" / "tiny-llama", "world": ROOT / "models" / "world-llama"}


def model_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: k and v are 128 x 256
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        use_cache=True,
    )


def token_stream(
    tokenizer,
    corpus: str,
    sentences: int,
    seed: int,
    *,
    questions: bool = False,
    pointing: bool = False,
    drills: float = 0.0,
) -> torch.Tensor:
    """The pretraining text as one tensor of token ids, documents separated by eos."""
    if corpus == "plain":
        documents = pretraining_text(make_world(0), random.Random(seed), sentences=sentences)
    else:  # a world document holds about six sentences' worth of text
        mix = POINTING_MIX if pointing else QUESTION_MIX if questions else STATEMENT_MIX
        documents = world_text(
            make_world(0),
            random.Random(seed),
            documents=sentences // 6,
            mix=mix,
            pointing=pointing,
            drills=drills,
        )
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def drill_batch(tokenizer, rng: random.Random, *, rows: int, kinds: tuple[str, ...], loss: str):
    """``rows`` look-ups with their answer digit, right-padded by the job's ``collate``: ``lookup``
    and ``knowledge`` are ``tiny_world.pointing_question``'s layout, ``drills`` the corpus's own
    (``tiny_world._drill``). The labels are the answer digit alone (``loss="answer"``, as
    fine-tuning on a response) or every token (``"all"``), so the model's own loss reads them."""
    world = make_world(0)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(1, 5)]
    examples = []
    for _ in range(rows):
        kind = rng.choice(kinds)
        if kind == "drills":  # the world corpus's drills: five layouts, several cues
            drill = _drill(world, rng)
            prompt, right = drill[:-1], int(drill[-1]) - 1
        else:
            prompt, right = pointing_question(rng.choice(world), rng.choice(ATTRIBUTES), kind, rng)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + [digits[right]]
        labels = ids if loss == "all" else [IGNORE_INDEX] * (len(ids) - 1) + ids[-1:]
        examples.append({"input_ids": ids, "labels": labels})
    return collate(examples, pad_token_id=tokenizer.pad_token_id)


def main() -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sentences", type=int, default=400_000)
    parser.add_argument(
        "--label_smoothing",
        type=float,
        default=None,
        help="Default: 0 for the plain corpus, 0.1 for the world corpus (see the module docstring).",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--corpus", choices=sorted(MODEL_DIRS), default="plain")
    parser.add_argument("--save_every", type=int, default=0, help="also save the weights every N steps")
    parser.add_argument("--output", default=None, help="default: the corpus's model folder")
    parser.add_argument(
        "--init_from", default=None, help="continue from this model's weights (a second stage)"
    )
    parser.add_argument(
        "--questions",
        action="store_true",
        help="the world corpus's question-heavy mix (tiny_world.QUESTION_MIX)",
    )
    parser.add_argument(
        "--pointing",
        action="store_true",
        help="the world corpus's multiple-choice mix (tiny_world.POINTING_MIX), options to point at",
    )
    parser.add_argument(
        "--drills",
        type=float,
        default=0.0,
        help="share of world documents that are look-up drills (tiny_world._drill): find an option, say its number",
    )
    parser.add_argument(
        "--pointing_rows",
        type=int,
        default=0,
        help="add this many look-up rows (tiny_world.pointing_question) to every step, with their own loss; "
        "--batch 0 trains on them alone",
    )
    parser.add_argument("--pointing_kinds", default="lookup,knowledge", help="of: lookup, knowledge, drills")
    parser.add_argument(
        "--pointing_loss",
        choices=("answer", "all"),
        default="answer",
        help="the look-ups' loss: on the answer digit alone, as fine-tuning on a response, or on every token",
    )
    parser.add_argument(
        "--probe_every", type=int, default=0, help="read check_base's pointing probe every N steps"
    )
    parser.add_argument(
        "--text_seed", type=int, default=7, help="seed of the generated text (a new stage: a new seed)"
    )
    args = parser.parse_args()
    kinds = tuple(args.pointing_kinds.split(","))
    if not set(kinds) <= {"lookup", "knowledge", "drills"}:
        parser.error(
            f"--pointing_kinds {args.pointing_kinds!r}: a comma-separated list of lookup, knowledge, drills"
        )
    if args.batch < 0 or args.pointing_rows < 0 or args.batch + args.pointing_rows == 0:
        parser.error("--batch and --pointing_rows must not be negative, and one of them must be positive")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    output = Path(args.output or MODEL_DIRS[args.corpus])
    if args.label_smoothing is None:
        args.label_smoothing = 0.1 if args.corpus == "world" else 0.0
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIRS[args.corpus])
    if args.batch:
        stream = token_stream(
            tokenizer,
            args.corpus,
            args.sentences,
            seed=args.text_seed,
            questions=args.questions,
            pointing=args.pointing,
            drills=args.drills,
        )
        sequences = stream[: len(stream) // args.seq * args.seq].view(-1, args.seq)
        order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(1))
        needed = args.steps * args.batch
        print(
            f"{len(stream):,} tokens, {len(sequences):,} sequences of {args.seq}; {needed:,} sequences in "
            f"training ({needed / len(sequences):.2f} epochs)",
            flush=True,
        )
    probe = None
    if args.probe_every:
        from check_base import pointing_probe as probe
    lookup_rng = random.Random(args.text_seed)
    model = (
        LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        if args.init_from
        else LlamaForCausalLM(model_config(tokenizer))
    )
    params = sum(p.numel() for p in model.parameters())
    print(f"{params:,} parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, cosine to a tenth
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    curve, start = [], time.perf_counter()
    for step in range(args.steps):
        loss = torch.zeros(())
        if args.batch:
            rows = order[(step * args.batch + torch.arange(args.batch)) % len(order)]
            batch = sequences[rows]
            logits = model(input_ids=batch).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                batch[:, 1:].reshape(-1),
                label_smoothing=args.label_smoothing,
            )
        if args.pointing_rows:
            lookups = drill_batch(
                tokenizer, lookup_rng, rows=args.pointing_rows, kinds=kinds, loss=args.pointing_loss
            )
            loss = loss + model(**lookups).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            curve.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(elapsed, 1)})
            print(f"step {step:5d}  loss {loss.item():.4f}  {elapsed / 60:.1f} min", flush=True)
        if probe and ((step + 1) % args.probe_every == 0 or step == args.steps - 1):
            pointing = probe(model, tokenizer)
            curve.append({"step": step + 1, "pointing_probe": pointing})
            print(
                f"step {step + 1:5d}  pointing probe: look-up {pointing['lookup']:.1%}, knowledge "
                f"{pointing['knowledge']:.1%}",
                flush=True,
            )
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            model.save_pretrained(output, safe_serialization=True)  # a checkpoint to probe early
    model.config.use_cache = True
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    log = {
        "args": {
            **vars(args),
            "output": str(output.relative_to(ROOT)) if output.is_relative_to(ROOT) else str(output),
        },
        "parameters": params,
        "tokens": int(args.steps * args.batch * args.seq),
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "curve": curve,
    }
    if args.init_from and (Path(args.init_from) / "pretrain_log.json").is_file():  # the stages before
        log["init_from"] = json.loads((Path(args.init_from) / "pretrain_log.json").read_text())
    (output / "pretrain_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"wrote {output} ({log['minutes']} minutes)")


if __name__ == "__main__":
    main()
