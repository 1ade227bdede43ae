"""Images in context (issue 17): Frozen's open-ended few-shot protocol and Fast-VQA, beside both blind baselines.

The pipeline, every run through the one trainer (a finished run folder of the same settings is reused, its CPU time
reported as null beside what its checkpoint records, ``reused_train_cpu_minutes``; one of other settings is refused):

1. the caption LM: ``fewshot data scene-corpus`` (captions + text binding episodes named from a generated glossary)
   and the gpt-scenes recipe (a 2-layer GPT, text only);
2. Frozen (configs/frozen-scenes.yaml): a conv4 encoder from scratch, through that frozen GPT, into 2 prefix
   embeddings, on a captioned scene pool (1–2 objects);
3. train-blind: the same recipe with ``method.blind=true`` (the encoder sees only blank images).

Evaluation (:mod:`fewshot.evaluate.vl_in_context`, greedy decoding, exact match, mean ± 95% CI over seeded
episodes, one query each; the same episodes for every row): per category (scene shapes, colours, the reserved
novel shapes, held-out Omniglot characters when ``$FEWSHOT_DATA`` has them), Frozen's columns — no induction 1
shot; induction 1/3/5 inner shots; induction 1 shot with 1/3/5 repeats — in rows 2-way and 5-way: Frozen (nonce
names), real names, test-blind (the Frozen run on blank images), train-blind (nonce names), and for the scene
categories "text only": the same episodes with every image replaced by its description in the corpus's words
("a small red circle.") through the same LM — what the LM does when told what each image shows, the ceiling a
perfect image prefix could reach. The simple baselines, no LM (:class:`NearestSupport`): the word-overlap rule on the
text-only episodes and, with ``--image-init``, 1-NN on that run's image tower. Fast-VQA at 0/1/3/5 shots: Frozen, test-blind, train-blind,
and the no-LM dominant-colour rule (:class:`DominantColour`: the query image's main colour, whatever the name asked).

Verdicts (a row beats another only when the intervals do not overlap, i.e. the difference exceeds both CIs):
2-way nonce with induction at 1 and 5 shots above test-blind and train-blind; Fast-VQA above train-blind; and whether the
whole run, reused runs' recorded training included, kept within ``--budget`` CPU-minutes (issue 17: 25).

    OMP_NUM_THREADS=1 FEWSHOT_DATA=/work/shared/data python bench/vl_in_context.py --pool runs/bench-vl/scenes-20000 --out runs/frozen/bench
        # 14.1 CPU-minutes on a shared 2-core CPU (training 10.2, evaluation 3.9; docs/benchmarks.md)
    OMP_NUM_THREADS=1 python bench/vl_in_context.py --quick     # a smoke run, measures nothing

With ``--lm`` an existing LM replaces step 1 (e.g. SmolLM2 after ``fewshot icl tune-lm`` on the corpus's answers, which
binds names in text where gpt-scenes does not), ``--image-init`` starts the conv4 from a clip-scenes run, and
``--ways``, ``--columns``, ``--vqa-shots`` cut the grid to what a 135M LM can be scored on in minutes:

    OMP_NUM_THREADS=2 FEWSHOT_DATA=/work/shared/data python bench/vl_in_context.py --pool runs/bench-vl/scenes-20000 \
        --out runs/vlctx/bench --lm runs/vlctx/smollm2-answers-160 --image-init runs/bench-vl/clip-20000-1000 --steps 250 \
        --override train.batch_size=16 --categories shapes colours --ways 2 --columns 1 3 --vqa-shots 1 3

``--lock`` freezes that tower in Frozen (only the linear map to the prefix learns); ``--word-targets β`` draws Frozen's
prefix from the LM's vocabulary and asks it to be each one-object caption's colour and shape tokens (``method.word_targets``,
not the paper's); ``--frozen-episodes N`` adds N naming
episodes to each Frozen and train-blind batch (``method.episodes``, the evaluation's layout with glossary names; a
departure from the paper, which trains Frozen on captions only). ``--flamingo-steps N`` adds Flamingo
over the same LM and tower (``--flamingo-episodes`` naming episodes per batch, ``method.episodes``) and its train-blind
(``method.blind=true``), with rows Flamingo, Flamingo test-blind and Flamingo train-blind and the same verdicts; for
SmolLM2 the recipe that names shapes (docs/benchmarks.md, "Flamingo with faster gates and a text teacher"; neither
option is the paper's: ``method.gate_lr_scale`` lets the tanh gates learn 30 times faster, ``method.text_distill`` makes
the frozen LM's reading of each episode in words a teacher) is ``--flamingo-steps 300 --flamingo-episodes 2
--flamingo-override method.cross_every=3 method.cross_heads=8 method.gate_lr_scale=30 method.text_distill=10
train.batch_size=16 train.lr=0.003 train.min_lr_ratio=0.1``, 18 CPU-minutes per Flamingo run. Both models with it and
Frozen's word targets, one run (docs/benchmarks.md, "Cheaper Flamingo steps, batched prompts, and both models in one
bench run"; 53.7 CPU-minutes, twice this bench's 25, all twelve verdicts "yes" at training seed 3):

    OMP_NUM_THREADS=1 FEWSHOT_DATA=/work/shared/data python bench/vl_in_context.py --pool runs/bench-vl/scenes-20000 \
        --out runs/both4 --lm runs/vlctx/smollm2-answers-160 --image-init runs/bench-vl/clip-20000-1000 --models frozen flamingo \
        --lock --word-targets 5.0 --steps 120 --override train.batch_size=16 train.lr=0.01 train.seed=3 --flamingo-steps 300 \
        --flamingo-episodes 2 --flamingo-override method.cross_every=3 method.cross_heads=8 method.gate_lr_scale=30 \
        method.text_distill=10 train.batch_size=16 train.lr=0.003 train.min_lr_ratio=0.1 train.seed=3 --categories shapes \
        --ways 2 --columns 1 3 --vqa-shots 1 3 --episodes 100

Inside the 25 CPU-minutes: the same recipes over a smaller frozen LM, the tuned SmolLM2 cut to 16 layers and the
scene world's 624 tokens and healed (``fewshot icl shrink-lm`` then ``fewshot icl tune-lm``; docs/benchmarks.md, "A
smaller frozen LM"), with one Fast-VQA-layout episode beside Flamingo's naming episodes (``method.question_episodes=1``,
not the paper's; without it Flamingo over the small LM answers the colour question with a naming template), Flamingo
trained 260 steps on 8 captions a step with the text teacher at δ = 20 (at δ = 10 it names as with blank images at one
seed of four after 260 steps, and needs 300), and ``--verdict-rows-only --episodes 150 --vqa-episodes 400`` (the rows
the verdicts read; Fast-VQA's accuracies near 10–40% need the episodes): 22.2–23.5 CPU-minutes, all twelve verdicts
"yes" at training seeds 0, 1, 2 and 3 (docs/benchmarks.md, "A stronger text teacher"):

    OMP_NUM_THREADS=1 FEWSHOT_DATA=/work/shared/data python bench/vl_in_context.py --pool runs/bench-vl/scenes-20000 \
        --out runs/t20s1 --lm runs/prune/g16-heal-160 --image-init runs/bench-vl/clip-20000-1000 --models frozen flamingo \
        --lock --word-targets 5.0 --steps 120 --override train.batch_size=16 train.lr=0.01 train.seed=1 --flamingo-steps 260 \
        --flamingo-episodes 2 --flamingo-override method.cross_every=3 method.cross_heads=8 method.gate_lr_scale=30 \
        method.text_distill=20 method.question_episodes=1 train.batch_size=8 train.lr=0.003 train.min_lr_ratio=0.1 \
        train.seed=1 --categories shapes --ways 2 --columns 1 3 --vqa-shots 1 3 --episodes 150 --vqa-episodes 400 \
        --verdict-rows-only

``--models flamingo`` trains and scores Flamingo alone (with its two blind rows), ``--models frozen`` Frozen alone (the
default without ``--flamingo-steps``); the text-only row is then read by the first model's frozen LM.
Frozen on the paper's captioning loss alone does not lift its image rows above test-blind; Frozen with word targets names
shapes above both blind baselines (docs/benchmarks.md, "The prefix as the caption's words"):

    OMP_NUM_THREADS=1 FEWSHOT_DATA=/work/shared/data python bench/vl_in_context.py --pool runs/bench-vl/scenes-20000 \
        --out runs/wt/bench5 --lm runs/vlctx/smollm2-answers-160 --image-init runs/bench-vl/clip-20000-1000 --lock \
        --word-targets 5.0 --steps 120 --override train.batch_size=16 train.lr=0.01 --categories shapes colours --ways 2 \
        --columns 1 3 --vqa-shots 1 3 --episodes 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reused_runs import recorded_cpu_seconds, scene_lm_config, train  # noqa: E402  (shared by the benches)

from fewshot import api
from fewshot.config import RunConfig
from fewshot.data.scenes import write_scenes
from fewshot.data.vl_prompts import CATEGORIES, category_images
from fewshot.errors import DataError
from fewshot.evaluate.vl_in_context import (
    BlankImages, DominantColour, NearestSupport, evaluate_fast_vqa, evaluate_open_ended, feature_cosine, frozen_columns, nonce_warnings, open_in_context_model, word_overlap,
)
from fewshot.evaluate.runner import above_beyond_ci95

COLUMNS = ("no ind. 1", "ind. 1", "ind. 3", "ind. 5", "1 rep. 1", "1 rep. 3", "1 rep. 5")
# The lecture's rows (Tsimpoukelli et al. 2021, Table 1, Open-Ended miniImageNet; Table 3, Fast-VQA), in COLUMNS' order.
LECTURE = {
    "2-way Frozen": [29.0, 53.4, 57.9, 58.9, 51.1, 57.7, 58.5],
    "2-way Real-Name": [1.7, 33.7, 66, 66, 63, 65, 63.7],
    "5-way Frozen": [18.0, 20.2, 22.3, 21.3, 21.4, 21.6, 20.9],
    "Fast-VQA Frozen": [1.6, 2.8, 7.0, 7.9],
    "Fast-VQA train-blind": [0.7, 0.3, 1.3, 0.4],
}
VQA_SHOTS = (0, 1, 3, 5)


def configs(args: argparse.Namespace, manifest: Path) -> dict[str, RunConfig]:
    out = args.out
    runs = {} if args.lm else {"gpt": scene_lm_config(out, args.gpt_steps, args.captions, args.text_episodes, args.seed, args.gpt_override)}
    lm = args.lm or runs["gpt"].run_dir
    image = [f"method.image.init={args.image_init}"] if args.image_init else []
    tag = ("-lock" if args.lock else "") + (f"-ep{args.frozen_episodes}" if args.frozen_episodes else "") + ("-words" if args.word_targets else "")
    words = ["method.vocab_prefix=hard", "method.vocab_from=captions", f"method.word_targets={args.word_targets}"] if args.word_targets else []
    for name, blind in (("frozen", False), ("train-blind", True)) if "frozen" in args.models else ():
        runs[name] = api.load_config(api.find_recipe("frozen-scenes"), [
            f"data.path={manifest}", f"out={out}", f"name={name}{tag}-{args.steps}", f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}",
            f"train.warmup_steps={min(50, args.steps // 10)}", f"method.lm.init={lm}", f"method.blind={str(blind).lower()}", *image,
            *(["method.image.lock=true"] if args.lock else []), f"method.episodes={args.frozen_episodes}", *words, *args.override])
    if "flamingo" in args.models:
        if not args.image_init:
            raise SystemExit("--flamingo-steps needs --image-init: Flamingo reads a frozen image tower")
        for name, blind in (("flamingo", False), ("flamingo-train-blind", True)):
            steps = args.flamingo_steps
            runs[name] = api.load_config(api.find_recipe("flamingo-scenes"), [
                f"data.path={manifest}", f"out={out}", f"name={name}-ep{args.flamingo_episodes}-{steps}", f"train.steps={steps}",
                f"train.checkpoint_every={steps}", f"train.warmup_steps={min(20, steps // 10)}", f"method.lm.init={lm}", *image,
                f"method.episodes={args.flamingo_episodes}", f"method.blind={str(blind).lower()}", *args.flamingo_override])
    return runs


def cell_text(cell: dict | None) -> str:
    return "      —     " if cell is None else f"{cell['accuracy']:5.1f} ± {cell['ci95']:4.1f}"


def one_cell(model, data, setting, args: argparse.Namespace, misfits: list[str], text_only: bool = False) -> dict | None:
    """One setting's accuracy ± CI, or None (and the reason kept) when its prompts do not fit the LM's context."""
    try:
        return next(iter(evaluate_open_ended(model, data, [setting], args.episodes, args.seed, text_only=text_only).values()))
    except DataError as exc:
        misfits.append(f"{setting.label}: {exc}")
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="the runs' folder (default: runs/frozen/bench; with --quick runs/frozen/bench-quick)")
    p.add_argument("--pool", help="a scene pool folder (fewshot data scenes, 32 px); default: OUT/scenes-N, written if absent")
    p.add_argument("--n", type=int, default=20000, help="scenes of a new pool")
    p.add_argument("--captions", type=int, default=20000, help="captions in the caption LM's corpus")
    p.add_argument("--text-episodes", type=int, default=8000, help="text binding episodes in the caption LM's corpus")
    p.add_argument("--gpt-steps", type=int, default=1800)
    p.add_argument("--steps", type=int, default=1000, help="Frozen's (and train-blind's) steps at batch 64")
    p.add_argument("--episodes", type=int, default=100, help="seeded episodes per cell")
    p.add_argument("--vqa-episodes", type=int, help="seeded episodes per Fast-VQA cell (default: --episodes); its accuracies lie "
                   "near 10–40%%, where 100 episodes leave CIs of ±6–10 points")
    p.add_argument("--per-class", type=int, default=12, help="evaluation images per class")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", nargs="*", default=[], help="key=value overrides of the Frozen runs")
    p.add_argument("--gpt-override", nargs="*", default=[], help="key=value overrides of the caption LM")
    p.add_argument("--lm", help="an existing frozen LM instead of training gpt-scenes: smollm2, a Hugging Face folder (e.g. from "
                   "`fewshot icl tune-lm`) or a gpt run")
    p.add_argument("--image-init", help="start Frozen's conv4 from this run's image tower (e.g. a clip-scenes run; the paper: a pre-trained NF-ResNet-50)")
    p.add_argument("--lock", action="store_true", help="freeze the --image-init tower in Frozen (only the linear map to the prefix learns)")
    p.add_argument("--frozen-episodes", type=int, default=0, help="naming episodes per Frozen batch (method.episodes; not the paper's, "
                   "which trains on captions only), for Frozen and its train-blind alike")
    p.add_argument("--word-targets", type=float, default=0.0, help="β > 0: Frozen's prefix drawn from the LM's vocabulary (hard, caption ids) "
                   "and asked to be each one-object caption's colour and shape tokens (method.word_targets; not the paper's)")
    p.add_argument("--flamingo-steps", type=int, default=0, help="also train Flamingo (and its train-blind) for this many steps over the same LM (0: no Flamingo rows)")
    p.add_argument("--flamingo-episodes", type=int, default=8, help="naming episodes per Flamingo batch (method.episodes)")
    p.add_argument("--flamingo-override", nargs="*", default=[], help="key=value overrides of the Flamingo runs, e.g. method.cross_every=6 for SmolLM2")
    p.add_argument("--models", nargs="+", choices=("frozen", "flamingo"), help="which models to train and score (default: frozen, "
                   "and flamingo when --flamingo-steps is set); each brings its test-blind and train-blind rows")
    p.add_argument("--ways", type=int, nargs="+", default=[2, 5])
    p.add_argument("--columns", type=int, nargs="+", default=list(range(len(COLUMNS))), help=f"indices of {COLUMNS} to run (others print —)")
    p.add_argument("--vqa-shots", type=int, nargs="+", default=list(VQA_SHOTS))
    p.add_argument("--verdict-rows-only", action="store_true", help="score only what the verdicts and the baselines read: each model, its "
                   "test-blind and train-blind naming rows, its train-blind Fast-VQA row, the word-overlap rule and 1-NN; drops Real-Name, "
                   "text only and the Fast-VQA test-blind rows (the text-only row depends on the LM and the episodes, not on training)")
    p.add_argument("--budget", type=float, default=25.0, help="the CPU-minutes issue 17 allows the whole run (reported, not enforced)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny pool, few steps and episodes; measures nothing")
    args = p.parse_args()
    if args.quick:
        args.n, args.captions, args.text_episodes = 200, 400, 200
        args.gpt_steps, args.steps, args.episodes, args.per_class = 4, 4, 3, 6
        args.gpt_override += ["encoder.options={dim: 32, depth: 1, heads: 2}", "train.batch_size=2"]
        args.override += ["train.batch_size=8"]
    args.out = args.out or ("runs/frozen/bench-quick" if args.quick else "runs/frozen/bench")
    args.vqa_episodes = args.vqa_episodes or args.episodes
    args.models = args.models or ["frozen"] + (["flamingo"] if args.flamingo_steps else [])
    if "flamingo" in args.models and not args.flamingo_steps:
        raise SystemExit("--models flamingo needs --flamingo-steps N")
    out = Path(args.out)
    pool = Path(args.pool) if args.pool else out / f"scenes-{args.n}"
    if not (pool / "scenes.json").is_file():
        write_scenes(pool, args.n, 32, (1, 2), args.seed)
    runs = configs(args, pool / "manifest.tsv")
    cpu = {name: train(config) for name, config in runs.items()}

    eval_cpu = time.process_time()
    rows, vqa_rows = {}, {}  # row → (model, names); Fast-VQA row → model
    if "frozen" in args.models:
        frozen, blind = (open_in_context_model(runs[name].run_dir) for name in ("frozen", "train-blind"))
        rows |= {"Frozen": (frozen, True), "Real-Name": (frozen, False), "test-blind": (BlankImages(frozen), True), "train-blind": (blind, True)}
        vqa_rows |= {"Frozen": frozen, "test-blind": BlankImages(frozen), "train-blind": blind}
    if "flamingo" in args.models:
        flamingo, flamingo_blind = (open_in_context_model(runs[name].run_dir) for name in ("flamingo", "flamingo-train-blind"))
        rows |= {"Flamingo": (flamingo, True), "Flamingo test-blind": (BlankImages(flamingo), True), "Flamingo train-blind": (flamingo_blind, True)}
        vqa_rows |= {"Flamingo": flamingo, "Flamingo test-blind": BlankImages(flamingo), "Flamingo train-blind": flamingo_blind}
    if args.verdict_rows_only:
        rows = {row: v for row, v in rows.items() if row != "Real-Name"}
        vqa_rows = {row: m for row, m in vqa_rows.items() if not row.endswith("test-blind")}
    lm_reader = next(iter(rows.values()))[0]  # the first model's frozen LM reads the text-only episodes
    baselines = {"word-overlap rule": (NearestSupport(word_overlap, "word overlap"), True)}
    if args.image_init:
        baselines["1-NN image tower"] = (NearestSupport(feature_cosine(api.open_run(args.image_init).encoder().eval()), "1-NN"), False)
    results: dict = {"categories": {}, "skipped": {}, "misfits": [], "warnings": nonce_warnings(lm_reader)}
    for category in args.categories:
        try:
            data = category_images(category, args.per_class, 32, args.seed)
        except DataError as exc:
            results["skipped"][category] = str(exc)
            continue
        table = {}
        for way in args.ways:
            for row, (model, nonce) in rows.items():
                if not nonce and category == "omniglot":
                    continue  # Omniglot characters have no real names
                table[f"{way}-way {row}"] = [one_cell(model, data, setting, args, results["misfits"]) if c in args.columns else None
                                             for c, setting in enumerate(frozen_columns(way, nonce))]
            if data.descriptions is not None and not args.verdict_rows_only:  # the LM told in words what each image shows: the ceiling the images aim at
                table[f"{way}-way text only"] = [one_cell(lm_reader, data, setting, args, results["misfits"], text_only=True) if c in args.columns else None
                                                 for c, setting in enumerate(frozen_columns(way, True))]
            for row, (model, text_only) in baselines.items():  # no LM: what a practitioner tries first (bench/vl_baselines.py)
                if text_only and data.descriptions is None:
                    continue
                table[f"{way}-way {row}"] = [one_cell(model, data, setting, args, results["misfits"], text_only=text_only) if c in args.columns else None
                                             for c, setting in enumerate(frozen_columns(way, True))]
        results["categories"][category] = table
    vqa_rows["dominant-colour rule"] = DominantColour()  # no LM: the query's main colour, whatever the name asked
    vqa = {row: list(evaluate_fast_vqa(m, args.vqa_shots, args.vqa_episodes, args.seed).values()) for row, m in vqa_rows.items()}
    eval_minutes = (time.process_time() - eval_cpu) / 60

    print(f"\nImages in context: exact-match accuracy (%, mean ± 95% CI over {args.episodes} seeded episodes, one query each); "
          f"LM: frozen {args.lm or f'gpt-scenes ({args.gpt_steps} steps)'}"
          + (f"; Frozen = conv4 {'from ' + args.image_init if args.image_init else 'from scratch'} → 2 prefix embeddings, "
             f"{args.steps} steps at batch {runs['frozen'].train.batch_size}" + (", the tower locked" if args.lock else "") if "frozen" in args.models else "")
          + (f"; Flamingo: {args.flamingo_steps} steps at batch {runs['flamingo'].train.batch_size}, {args.flamingo_episodes} naming episodes "
             f"per batch" if "flamingo" in args.models else ""))
    header = f"{'':28s}" + "".join(f"{c:>14s}" for c in COLUMNS)
    for category, table in results["categories"].items():
        print(f"\n{category}\n{header}")
        for row, cells in table.items():
            print(f"{row:28s}" + "".join(f"{cell_text(c):>14s}" for c in cells))
    for category, reason in results["skipped"].items():
        print(f"\n{category}: skipped ({reason})")
    print(f"\nlecture (Open-Ended miniImageNet)\n{header}")
    for row, values in LECTURE.items():
        if not row.startswith("Fast-VQA"):
            print(f"{row:28s}" + "".join(f"{v:>14.1f}" for v in values))
    print(f"\nFast-VQA, {args.vqa_episodes} episodes per cell\nFast-VQA (shots per named shape){'':4s}" + "".join(f"{k:>14d}" for k in args.vqa_shots))
    for row, cells in vqa.items():
        print(f"{row:36s}" + "".join(f"{cell_text(c):>14s}" for c in cells))
    for row in ("Fast-VQA Frozen", "Fast-VQA train-blind"):
        print(f"lecture {row[9:]:28s}" + "".join(f"{v:>14.1f}" for v in LECTURE[row]))

    verdicts = {}
    models = ({"Frozen": ""} if "frozen" in args.models else {}) | ({"Flamingo": "Flamingo "} if "flamingo" in args.models else {})  # → its blind rows' prefix
    for model, blinds in models.items():
        for category, table in results["categories"].items():
            for col, name in ((1, "induction 1 shot"), (3, "induction 5 shots")):
                if f"2-way {model}" not in table:
                    continue
                f, tb, rb = (table[f"2-way {row}"][col] for row in (model, f"{blinds}test-blind", f"{blinds}train-blind"))
                verdicts[f"{model}, {category}: 2-way nonce {name} above test-blind"] = None if f is None or tb is None else above_beyond_ci95(f, tb)
                verdicts[f"{model}, {category}: 2-way nonce {name} above train-blind"] = None if f is None or rb is None else above_beyond_ci95(f, rb)
        for k, shots in enumerate(args.vqa_shots):
            verdicts[f"{model}, Fast-VQA {shots} shots above train-blind"] = above_beyond_ci95(vqa[model][k], vqa[f"{blinds}train-blind"][k])
    print("\nverdicts (beyond both CIs):")
    for claim, ok in verdicts.items():
        print(f"  {'n/a' if ok is None else 'yes' if ok else 'NO '}  {claim}")
    for w in results["warnings"]:
        print(f"warning: {w}")
    for m in dict.fromkeys(results["misfits"]):
        print(f"not run: {m}")
    cpu_minutes = {k: None if v is None else round(v / 60, 2) for k, v in cpu.items()}
    total = time.process_time() / 60  # the whole process: loading, training, evaluation
    reused = {k: recorded_cpu_seconds(runs[k]) for k, v in cpu.items() if v is None}  # what their checkpoints record
    reused_minutes = {k: None if v is None else round(v / 60, 2) for k, v in reused.items()}
    whole = None if None in reused.values() else round(total + sum(reused.values()) / 60, 2)  # the process and reused training
    print(f"CPU-minutes: training {cpu_minutes} (null: reused), evaluation {eval_minutes:.2f}, this process in all {total:.2f}"
          + (f"; reused runs' training as recorded {reused_minutes} (null: not recorded), with them {whole}" if reused else ""))
    within = None if whole is None else whole <= args.budget
    print(f"within the {args.budget:g} CPU-minute budget: {'n/a (a reused run recorded no CPU time)' if within is None else 'yes' if within else 'NO'}")
    print(json.dumps({"bench": "vl_in_context", "episodes": args.episodes, "vqa_episodes": args.vqa_episodes, "seed": args.seed, "lm": args.lm, "image_init": args.image_init, "lock": args.lock,
                      "frozen_episodes": args.frozen_episodes, "word_targets": args.word_targets, "models": args.models, "flamingo_steps": args.flamingo_steps, "flamingo_episodes": args.flamingo_episodes,
                      "flamingo_override": args.flamingo_override, "override": args.override, "verdict_rows_only": args.verdict_rows_only,
                      "gpt_steps": None if args.lm else args.gpt_steps, "steps": args.steps, "vqa_shots": args.vqa_shots,
                      "categories": results["categories"], "skipped": results["skipped"], "misfits": sorted(set(results["misfits"])), "fast_vqa": vqa, "verdicts": verdicts,
                      "train_cpu_minutes": cpu_minutes, "eval_cpu_minutes": round(eval_minutes, 2), "total_cpu_minutes": round(total, 2),
                      "reused_train_cpu_minutes": reused_minutes, "total_with_reused_cpu_minutes": whole,
                      "budget_cpu_minutes": args.budget, "within_budget": within,
                      "warnings": results["warnings"],
                      "lecture": LECTURE, "quick": args.quick}))


if __name__ == "__main__":
    sys.exit(main())
