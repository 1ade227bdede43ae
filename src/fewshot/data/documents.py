"""MMC4's assignment of a document's images to its sentences (Zhu et al. 2023, Multimodal C4), on generated documents.

MMC4 interleaves the images of a web page with its sentences: each image is placed at the sentence its CLIP embedding
is most like, as a bipartite matching — an image to at most one sentence, a sentence to at most one image — that
maximises the total similarity, and images too unlike every sentence are discarded (MMC4: cosine < 0.15 under
ViT-L/14). Here, for a document with similarity s (images × sentences) and a floor f:

    maximise Σ_{(i, j) ∈ A} s_ij over matchings A ⊆ {(i, j) : s_ij ≥ f},

where an image or a sentence may stay unmatched, so an edge of s_ij ≤ 0 never adds to the sum and is never taken.
It is solved by one rectangular linear assignment (scipy's ``linear_sum_assignment``, maximising) on
w_ij = s_ij where s_ij ≥ f and s_ij > 0, else 0, dropping the pairs of weight 0: a maximum of Σ w over complete
matchings is a maximum over partial ones, since a weight-0 pair adds nothing.

Documents (:func:`make_documents`): each is ``sentences`` scenes' captions (the longest of each scene's captions,
the one that names the most), the images of a random non-empty subset of those scenes, and ``unrelated`` images of
scenes no sentence describes, in shuffled order; a JSON-lines file, one document a line:
``{"document": id, "sentences": [...], "images": [paths], "truth": [sentence index or null per image]}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from fewshot.data.image_files import decode_image
from fewshot.errors import DataError
from fewshot.io import atomic_write

__all__ = ["Document", "assign_images", "assignment_report", "make_documents", "read_documents"]

DOCUMENTS_FILE = "documents.jsonl"


@dataclass
class Document:
    name: str
    sentences: list[str]
    images: list[str]  # paths as written (relative to the documents file's folder)
    truth: list[int | None]  # per image: the sentence it illustrates, None for an unrelated image


def assign_images(similarity: np.ndarray, floor: float) -> list[tuple[int, int]]:
    """MMC4's assignment: the (image, sentence) pairs of a maximum-total-similarity matching of ``similarity``
    (images × sentences) that uses only pairs of similarity ≥ ``floor`` (and > 0); sorted by image."""
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2:
        raise DataError(f"the similarity must be a matrix (images × sentences), got shape {s.shape}")
    if s.size == 0:
        return []
    weights = np.where((s >= floor) & (s > 0), s, 0.0)
    rows, cols = linear_sum_assignment(weights, maximize=True)
    return sorted((int(i), int(j)) for i, j in zip(rows, cols) if weights[i, j] > 0)


def assignment_report(documents: list[Document], assignments: list[list[tuple[int, int]]]) -> dict:
    """Precision (assigned pairs whose image illustrates that sentence), recall (images with a sentence that were
    assigned to it), and the share of unrelated images left unassigned (what the floor is for)."""
    assigned = correct = related = unrelated = unrelated_left = 0
    for doc, pairs in zip(documents, assignments):
        placed = dict(pairs)
        assigned += len(pairs)
        correct += sum(doc.truth[i] == j for i, j in pairs)
        related += sum(t is not None for t in doc.truth)
        unrelated += sum(t is None for t in doc.truth)
        unrelated_left += sum(t is None and i not in placed for i, t in enumerate(doc.truth))
    return {"documents": len(documents), "images": related + unrelated, "assigned": assigned,
            "precision": correct / assigned if assigned else None, "recall": correct / related if related else None,
            "unrelated": unrelated, "unrelated_unassigned": unrelated_left / unrelated if unrelated else None}


def make_documents(out: str | os.PathLike[str], n: int, size: int = 32, seed: int = 0, sentences: tuple[int, int] = (3, 6),
                   unrelated: int = 1, split_seed: int = 0, objects: tuple[int, int] = (1, 2)) -> Path:
    """``n`` generated documents in the new folder ``out`` (images/ and :data:`DOCUMENTS_FILE`); returns the file."""
    from PIL import Image

    from fewshot.data.scenes import captions_for, heldout_pairs, render, sample_scenes, seen_pairs

    out = Path(out)
    if out.exists():
        raise DataError(f"'{out}' already exists; documents are written to a new folder")
    rng = np.random.default_rng([seed, 40])
    (out / "images").mkdir(parents=True)
    lines = []
    image_count = 0
    for d in range(n):
        k = int(rng.integers(sentences[0], sentences[1] + 1))
        scenes = sample_scenes(rng, k + unrelated, objects, seen_pairs(heldout_pairs(split_seed)))
        pictures = render(scenes, size)
        texts = [max(captions_for(s, rng), key=lambda c: (len(c.split()), c)) for s in scenes[:k]]
        shown = sorted(rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False).tolist())
        members = [(i, i) for i in shown] + [(k + u, None) for u in range(unrelated)]
        members = [members[i] for i in rng.permutation(len(members))]
        paths = []
        for scene_index, _ in members:
            path = f"images/{image_count:06d}.png"
            Image.fromarray(pictures[scene_index].transpose(1, 2, 0)).save(out / path)
            paths.append(path)
            image_count += 1
        lines.append(json.dumps({"document": f"doc-{d:05d}", "sentences": texts, "images": paths, "truth": [t for _, t in members]}))
    file = out / DOCUMENTS_FILE
    atomic_write(file, lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return file


def read_documents(path: str | os.PathLike[str]) -> list[Document]:
    """The documents of a JSON-lines file (:func:`make_documents`' layout; ``truth`` optional). One-line DataError
    naming the line for a line that is not such an object."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"documents file '{path}' is not a file")
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            sentences, images = [str(s) for s in row["sentences"]], [str(i) for i in row["images"]]
            truth = row.get("truth") or [None] * len(images)
            if len(truth) != len(images) or any(t is not None and not 0 <= int(t) < len(sentences) for t in truth):
                raise ValueError("its truth needs one sentence index or null per image")
            documents.append(Document(str(row.get("document", number)), sentences, images, [None if t is None else int(t) for t in truth]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path} line {number}: not a document ({{'sentences': [...], 'images': [...]}}): {exc}") from None
    if not documents:
        raise DataError(f"documents file '{path}' holds no documents")
    return documents


def read_document_images(path: str | os.PathLike[str], document: Document, size: int, channels: int = 3) -> np.ndarray:
    """A document's images (N, C, size, size) uint8, paths relative to the documents file's folder."""
    root = Path(path).parent
    out = np.empty((len(document.images), channels, size, size), dtype=np.uint8)
    for i, name in enumerate(document.images):
        file = Path(name) if os.path.isabs(name) else root / name
        if not file.is_file():
            raise DataError(f"{path}: document {document.name}'s image '{name}' does not exist (looked for {file})")
        out[i] = np.rint(decode_image(file.read_bytes(), size, channels, source=f"'{name}'") * 255)
    return out
