"""Character-level datasets: tiny Shakespeare and a synthetic Markov language.

Everything here is a small pure function on numpy arrays, except the two
batch helpers at the end:

* :func:`text_dataset` / :func:`load_text_file` turn text into a
  :class:`CharDataset` (sorted character vocabulary, contiguous 90/10
  train/val split of the encoded ids);
* :func:`shakespeare_path` finds (or downloads, once, into a cache) the tiny
  Shakespeare file and always checks its sha256; :func:`load_shakespeare`
  wraps it;
* :func:`markov_language` builds a random sparse Markov chain whose entropy
  rate — the best achievable next-token loss — is computed exactly, and
  :func:`markov_dataset` samples train / val sequences from it;
* :func:`sample_batch` draws random training windows, deterministically from
  ``(key, step)`` and jittable with a traced ``step``; :func:`eval_batches`
  cuts the validation split into fixed non-overlapping windows.

Vocabularies are stored as JSON lists of characters (:func:`save_vocab`,
:func:`load_vocab`); nothing is pickled.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import pathlib
import string
import tempfile
import urllib.request
from collections.abc import Sequence
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from ebc_optax import advanced

PathLike = Union[str, os.PathLike]

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
    "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = (
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")
SHAKESPEARE_FILENAME = "tinyshakespeare.txt"
DATA_ENV_VAR = "EBC_OPTAX_DATA"

# The Markov language's characters: state i is MARKOV_ALPHABET[i]. Lower case
# first, then upper case, digits and punctuation without quotes, backquote and
# backslash (so that every character prints plainly): 90 characters.
MARKOV_ALPHABET = (
    string.ascii_lowercase + string.ascii_uppercase + string.digits
    + "".join(c for c in string.punctuation if c not in "\"'`\\"))
assert len(MARKOV_ALPHABET) == 90

_MAX_MARKOV_ATTEMPTS = 100
_HASH_CHUNK = 1 << 20


# --- character datasets ------------------------------------------------------

class CharDataset(NamedTuple):
  """A character-level dataset: token ids and the vocabulary they index.

  Attributes:
    train: int32 [N_train], the training token ids.
    val: int32 [N_val], the validation token ids.
    vocab: the characters, ``vocab[i]`` is token ``i`` (sorted unique
      characters for text; state order for the Markov language).
    name: a short name (``"shakespeare"``, ``"markov"``, a file stem, ...).
    entropy_floor: the best achievable loss in nats/token when it is known
      exactly (the Markov language's entropy rate); ``None`` for text.
  """
  train: np.ndarray
  val: np.ndarray
  vocab: tuple[str, ...]
  name: str
  entropy_floor: float | None = None

  @property
  def vocab_size(self) -> int:
    """The number of distinct tokens."""
    return len(self.vocab)


def _check_vocab(vocab: Sequence[str]) -> tuple[str, ...]:
  vocab = tuple(vocab)
  for c in vocab:
    if not isinstance(c, str) or len(c) != 1:
      raise ValueError(
          f"vocab entries must be single characters; got {c!r}.")
  if len(set(vocab)) != len(vocab):
    raise ValueError("vocab entries must be unique.")
  return vocab


def _codepoints(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def encode(text: str, vocab: Sequence[str]) -> np.ndarray:
  """Token ids of ``text`` under ``vocab``.

  Vectorised over code points, so encoding a megabyte takes milliseconds.

  Args:
    text: the string to encode.
    vocab: single characters; ``vocab[i]`` is token ``i``.

  Returns:
    int32 [len(text)] token ids.

  Raises:
    ValueError: if ``text`` contains a character outside ``vocab``.
  """
  vocab = _check_vocab(vocab)
  codes = _codepoints(text)
  if codes.size == 0:
    return np.zeros((0,), np.int32)
  if not vocab:
    raise ValueError(f"character {text[0]!r} is not in the (empty) vocab.")
  vocab_codes = _codepoints("".join(vocab))
  order = np.argsort(vocab_codes)
  sorted_codes = vocab_codes[order]
  pos = np.clip(np.searchsorted(sorted_codes, codes), 0, len(vocab) - 1)
  missing = sorted_codes[pos] != codes
  if np.any(missing):
    unknown = sorted({chr(c) for c in codes[missing].tolist()})
    raise ValueError(f"characters not in the vocab: {unknown[:10]!r}.")
  return order[pos].astype(np.int32)


def decode(ids: np.ndarray | Sequence[int], vocab: Sequence[str]) -> str:
  """The string spelled by token ``ids`` under ``vocab``.

  Args:
    ids: integer token ids (any shape; flattened in C order).
    vocab: single characters; ``vocab[i]`` is token ``i``.

  Returns:
    The decoded string.

  Raises:
    ValueError: if an id is outside ``[0, len(vocab))``.
  """
  vocab = _check_vocab(vocab)
  ids = np.asarray(ids).reshape(-1)
  if ids.size == 0:
    return ""
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids must be integers; got dtype {ids.dtype}.")
  if ids.min() < 0 or ids.max() >= len(vocab):
    raise ValueError(
        f"ids must be in [0, {len(vocab)}); got range "
        f"[{int(ids.min())}, {int(ids.max())}].")
  vocab_codes = _codepoints("".join(vocab))
  return vocab_codes[ids].astype("<u4").tobytes().decode("utf-32-le")


def split_ids(ids: np.ndarray,
              val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Contiguous train / val split: the first part trains, the rest validates.

  ``N_train = int(N · (1 - val_fraction))`` (the nanoGPT convention); both
  parts must hold at least two tokens (one input / target pair).

  Args:
    ids: [N] token ids.
    val_fraction: the validation share, in ``(0, 1)``.

  Returns:
    ``(train, val)``, int32.

  Raises:
    ValueError: for ``val_fraction`` outside ``(0, 1)`` or too few tokens.
  """
  advanced.check_number("val_fraction", val_fraction, lo=0.0, hi=1.0,
                           lo_open=True, hi_open=True)
  ids = np.asarray(ids, np.int32).reshape(-1)
  n = ids.shape[0]
  if n == 0:
    raise ValueError("cannot split an empty token sequence (empty text?).")
  n_train = int(n * (1.0 - val_fraction))
  if n_train < 2 or n - n_train < 2:
    raise ValueError(
        f"{n} tokens are too few to split with val_fraction={val_fraction}: "
        f"train would get {n_train} and val {n - n_train} (need >= 2 each).")
  return ids[:n_train], ids[n_train:]


def text_dataset(text: str, name: str,
                 val_fraction: float = 0.1) -> CharDataset:
  """A :class:`CharDataset` of ``text``: sorted character vocab, 90/10 split.

  Args:
    text: the whole corpus.
    name: the dataset's name.
    val_fraction: the share of the (encoded) text, taken from its end, used
      for validation; in ``(0, 1)``.

  Returns:
    The dataset, with ``entropy_floor=None``.

  Raises:
    ValueError: for an empty or too short text, or a bad ``val_fraction``.
  """
  advanced.check_number("val_fraction", val_fraction, lo=0.0, hi=1.0,
                           lo_open=True, hi_open=True)
  if not text:
    raise ValueError(f"text of dataset {name!r} is empty.")
  vocab = tuple(sorted(set(text)))
  train, val = split_ids(encode(text, vocab), val_fraction)
  return CharDataset(train=train, val=val, vocab=vocab, name=name,
                     entropy_floor=None)


def read_utf8(path: PathLike) -> str:
  """The contents of ``path`` decoded as strict UTF-8 (newlines untouched).

  Args:
    path: a text file.

  Returns:
    Its text.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: naming ``path`` if it is not valid UTF-8.
  """
  path = pathlib.Path(path)
  data = path.read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not valid UTF-8: {e}") from e


def load_text_file(path: PathLike, val_fraction: float = 0.1) -> CharDataset:
  """A :class:`CharDataset` of a UTF-8 text file, named after its stem.

  Args:
    path: the text file.
    val_fraction: see :func:`text_dataset`.

  Returns:
    The dataset.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if it is not valid UTF-8, or as :func:`text_dataset`.
  """
  path = pathlib.Path(path)
  return text_dataset(read_utf8(path), path.stem, val_fraction)


def save_vocab(vocab: Sequence[str], path: PathLike) -> None:
  """Writes ``vocab`` as a JSON list of characters (ASCII-escaped).

  Args:
    vocab: single, unique characters.
    path: the JSON file to write (its directory must exist).
  """
  vocab = _check_vocab(vocab)
  pathlib.Path(path).write_text(json.dumps(list(vocab)) + "\n",
                                encoding="utf-8")


def load_vocab(path: PathLike) -> tuple[str, ...]:
  """Reads a vocabulary written by :func:`save_vocab`.

  Args:
    path: the JSON file.

  Returns:
    The characters, in token order.

  Raises:
    ValueError: naming ``path`` if it is not a JSON list of unique single
      characters.
  """
  path = pathlib.Path(path)
  try:
    vocab = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(vocab, list):
    raise ValueError(f"{path} must hold a JSON list of characters.")
  try:
    return _check_vocab(vocab)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


# --- tiny Shakespeare --------------------------------------------------------

def sha256_of(path: PathLike) -> str:
  """The hex sha256 digest of the file at ``path`` (read in 1 MiB chunks)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _verify_sha256(path: pathlib.Path, expected: str, what: str = "") -> None:
  actual = sha256_of(path)
  if actual != expected:
    raise ValueError(
        f"sha256 mismatch for {what}{path}: expected {expected}, got {actual}. "
        "The file is corrupt or a different file; delete or replace it.")


def default_cache_dir() -> pathlib.Path:
  """``$XDG_CACHE_HOME/ebc_optax``, or ``~/.cache/ebc_optax`` if unset."""
  xdg = os.environ.get("XDG_CACHE_HOME")
  base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
  return base / "ebc_optax"


def _fetch(url: str, dest: pathlib.Path) -> None:
  """Downloads ``url`` into the (existing, empty) file ``dest``.

  The only function here that touches the network; tests replace it.
  """
  with urllib.request.urlopen(url, timeout=60) as response:
    with open(dest, "wb") as f:
      for chunk in iter(lambda: response.read(_HASH_CHUNK), b""):
        f.write(chunk)


def _download_verified(url: str, final: pathlib.Path, expected: str) -> None:
  """Fetches ``url`` into a temporary file next to ``final``, verifies, renames."""
  final.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.",
                                  suffix=".part")
  os.close(fd)
  tmp = pathlib.Path(tmp_name)
  try:
    _fetch(url, tmp)
    _verify_sha256(tmp, expected, what=f"the download of {url} into ")
    os.replace(tmp, final)
  finally:
    tmp.unlink(missing_ok=True)


def shakespeare_path(cache_dir: PathLike | None = None, *,
                     download: bool = True) -> pathlib.Path:
  """The path of a verified tiny Shakespeare file, downloading it if needed.

  Resolution order:

  1. ``$EBC_OPTAX_DATA``, if set: a file, or a directory holding
     ``tinyshakespeare.txt`` (an explicit setting that points nowhere is an
     error, never silently skipped);
  2. ``<cache_dir>/tinyshakespeare.txt``, ``cache_dir`` defaulting to
     :func:`default_cache_dir`;
  3. if ``download``: :data:`SHAKESPEARE_URL` is fetched into a temporary file
     in ``cache_dir``, verified, and atomically renamed into place (a download
     with the wrong hash is deleted).

  The sha256 is checked in every case, also for files found in 1 or 2.

  Args:
    cache_dir: the cache directory, or ``None`` for the default.
    download: whether step 3 may run.

  Returns:
    The path of the verified file.

  Raises:
    FileNotFoundError: if ``$EBC_OPTAX_DATA`` points nowhere, or no file is
      found and ``download`` is False.
    ValueError: if the file's sha256 is not :data:`SHAKESPEARE_SHA256`
      (the message holds expected and actual hash and the path).
  """
  env = os.environ.get(DATA_ENV_VAR)
  if env:
    path = pathlib.Path(env).expanduser()
    if path.is_dir():
      path = path / SHAKESPEARE_FILENAME
    if not path.is_file():
      raise FileNotFoundError(
          f"{DATA_ENV_VAR}={env!r} is set, but {path} does not exist; point it "
          f"to the tiny Shakespeare file or a directory holding "
          f"{SHAKESPEARE_FILENAME}, or unset it.")
    _verify_sha256(path, SHAKESPEARE_SHA256)
    return path

  cache = (pathlib.Path(cache_dir).expanduser() if cache_dir is not None
           else default_cache_dir())
  path = cache / SHAKESPEARE_FILENAME
  if not path.is_file():
    if not download:
      raise FileNotFoundError(
          f"tiny Shakespeare not found at {path} and download=False. Set "
          f"{DATA_ENV_VAR} to the file (or a directory holding "
          f"{SHAKESPEARE_FILENAME}), put it into the cache directory, or allow "
          f"the download from {SHAKESPEARE_URL}.")
    _download_verified(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
  _verify_sha256(path, SHAKESPEARE_SHA256)
  return path


def load_shakespeare(cache_dir: PathLike | None = None,
                     val_fraction: float = 0.1, *,
                     download: bool = True) -> CharDataset:
  """The tiny Shakespeare :class:`CharDataset` (65 characters, 1,115,394 tokens).

  Args:
    cache_dir: see :func:`shakespeare_path`.
    val_fraction: see :func:`text_dataset`.
    download: see :func:`shakespeare_path`.

  Returns:
    The dataset, named ``"shakespeare"``.
  """
  path = shakespeare_path(cache_dir, download=download)
  return text_dataset(read_utf8(path), "shakespeare", val_fraction)


# --- the synthetic Markov language -------------------------------------------

class MarkovLanguage(NamedTuple):
  """A stationary Markov chain over ``V`` tokens.

  Attributes:
    transition: float64 [V, V], ``P[i, j] = p(x_{t+1} = j | x_t = i)``; rows
      sum to 1.
    stationary: float64 [V], the stationary distribution ``π = πP``.
    entropy_rate: ``Σ_i π_i H(P_i)`` in nats/token — the loss of the true
      model, hence the floor of any next-token cross-entropy.
  """
  transition: np.ndarray
  stationary: np.ndarray
  entropy_rate: float

  @property
  def vocab_size(self) -> int:
    """The number of states ``V``."""
    return self.transition.shape[0]


def stationary_distribution(transition: np.ndarray) -> np.ndarray:
  """The stationary distribution of an irreducible chain, by a linear solve.

  Solves ``(Pᵀ - I) π = 0`` with one equation replaced by ``Σ π = 1``.

  Args:
    transition: [V, V] row-stochastic matrix of an irreducible chain.

  Returns:
    float64 [V] ``π`` with ``πP = π``, ``Σ π = 1``.
  """
  p = np.asarray(transition, np.float64)
  v = p.shape[0]
  a = p.T - np.eye(v)
  a[-1, :] = 1.0
  b = np.zeros(v)
  b[-1] = 1.0
  pi = np.linalg.solve(a, b)
  return pi / pi.sum()


def entropy_rate(transition: np.ndarray, stationary: np.ndarray) -> float:
  """``Σ_i π_i H(P_i)`` in nats/token (``0 log 0 = 0``)."""
  p = np.asarray(transition, np.float64)
  plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  return float(np.asarray(stationary, np.float64) @ -plogp.sum(axis=1))


def _is_primitive(mask: np.ndarray) -> bool:
  """Whether the directed graph ``mask`` is irreducible and aperiodic.

  A non-negative matrix is primitive iff ``A^k > 0`` for
  ``k = (V-1)² + 1`` (Wielandt), and then for every larger ``k``; so squaring
  until the exponent passes that bound decides it.
  """
  v = mask.shape[0]
  power = mask.astype(np.int64)
  exponent = 1
  while exponent < (v - 1) ** 2 + 1:
    power = (power @ power > 0).astype(np.int64)
    exponent *= 2
  return bool(np.all(power > 0))


def _random_transition(rng: np.random.Generator, vocab_size: int,
                       support: int, concentration: float) -> np.ndarray:
  """Rows with ``support`` successors, always including ``i + 1 mod V``."""
  trans = np.zeros((vocab_size, vocab_size))
  for i in range(vocab_size):
    nxt = (i + 1) % vocab_size
    others = np.delete(np.arange(vocab_size), nxt)
    cols = np.concatenate(
        [[nxt], rng.choice(others, support - 1, replace=False)]).astype(int)
    trans[i, cols] = rng.dirichlet(np.full(support, float(concentration)))
  return trans / trans.sum(axis=1, keepdims=True)


def markov_language(seed: int = 0, vocab_size: int = 32, support: int = 4,
                    concentration: float = 1.0) -> MarkovLanguage:
  """A random sparse Markov language with an exactly known entropy rate.

  Each row of the transition table has exactly ``support`` non-zero entries:
  the successor ``i + 1 mod V`` (so the chain is irreducible) and
  ``support - 1`` further distinct states drawn at random, weighted by
  ``Dirichlet(concentration)``. Tables whose chain is not aperiodic (or whose
  Dirichlet draw underflowed to zero) are redrawn from the same generator,
  so the result is a deterministic function of the arguments. With
  ``support == 1`` the chain is the deterministic cycle ``i -> i + 1``
  (irreducible, periodic, entropy rate 0).

  Args:
    seed: seed of ``numpy.random.default_rng``.
    vocab_size: the number of states ``V >= 2``.
    support: successors per state, in ``[1, vocab_size]``.
    concentration: the Dirichlet concentration ``> 0`` (small: peaked rows,
      low entropy; large: near-uniform rows over the support).

  Returns:
    The :class:`MarkovLanguage`.

  Raises:
    ValueError: for an argument out of range.
    RuntimeError: if no primitive table is found (only for extreme
      ``concentration`` whose draws underflow).
  """
  advanced.check_number("seed", seed, lo=0, integer=True)
  advanced.check_number("vocab_size", vocab_size, lo=2, integer=True)
  advanced.check_number("support", support, lo=1, hi=vocab_size,
                           integer=True)
  advanced.check_number("concentration", concentration, lo=0.0,
                           lo_open=True)
  rng = np.random.default_rng(seed)
  for _ in range(_MAX_MARKOV_ATTEMPTS):
    trans = _random_transition(rng, vocab_size, support, concentration)
    if support == 1 or _is_primitive(trans > 0):
      pi = stationary_distribution(trans)
      if np.all(pi > 0):
        return MarkovLanguage(transition=trans, stationary=pi,
                              entropy_rate=entropy_rate(trans, pi))
  raise RuntimeError(
      f"no irreducible aperiodic table in {_MAX_MARKOV_ATTEMPTS} draws for "
      f"vocab_size={vocab_size}, support={support}, "
      f"concentration={concentration}; increase concentration.")


def sample_markov(lang: MarkovLanguage, length: int,
                  rng: np.random.Generator) -> np.ndarray:
  """One stationary sequence of the chain: ``x_0 ~ π``, then ``x_{t+1} ~ P[x_t]``.

  Args:
    lang: the language.
    length: the number of tokens, ``>= 1``.
    rng: the numpy generator (consumed).

  Returns:
    int32 [length] states.
  """
  advanced.check_number("length", length, lo=1, integer=True)
  trans = np.asarray(lang.transition, np.float64)
  # Per state: its successors and their cumulative probabilities, the last one
  # set to 1 so that every u in [0, 1) lands on a successor.
  succ, cdfs = [], []
  for row in trans:
    cols = np.flatnonzero(row > 0)
    cdf = np.cumsum(row[cols])
    cdf[-1] = 1.0
    succ.append(cols.tolist())
    cdfs.append(cdf.tolist())
  pi_cdf = np.cumsum(lang.stationary)
  pi_cdf[-1] = 1.0
  u = rng.random(length)
  out = [0] * length
  state = min(int(np.searchsorted(pi_cdf, u[0], side="right")),
              len(pi_cdf) - 1)
  out[0] = state
  for t, ut in enumerate(u[1:].tolist(), start=1):
    state = succ[state][bisect.bisect_right(cdfs[state], ut)]
    out[t] = state
  return np.asarray(out, np.int32)


def markov_dataset(lang: MarkovLanguage, train_tokens: int, val_tokens: int,
                   seed: int) -> CharDataset:
  """A :class:`CharDataset` sampled from ``lang``: one sequence per split.

  Train and val use independent numpy generators spawned from ``seed``; each
  sequence starts from the stationary distribution. State ``i`` is the
  character ``MARKOV_ALPHABET[i]`` (``a`` ... ``z``, then ``A`` ... ``Z``,
  digits, punctuation).

  Args:
    lang: the language, with ``V <= 90`` states.
    train_tokens: the train length, ``>= 2``.
    val_tokens: the val length, ``>= 2``.
    seed: the sampling seed.

  Returns:
    The dataset, named ``"markov"``, with ``entropy_floor = lang.entropy_rate``.
  """
  advanced.check_number("train_tokens", train_tokens, lo=2, integer=True)
  advanced.check_number("val_tokens", val_tokens, lo=2, integer=True)
  advanced.check_number("seed", seed, lo=0, integer=True)
  v = lang.vocab_size
  if v > len(MARKOV_ALPHABET):
    raise ValueError(
        f"vocab_size must be in [2, {len(MARKOV_ALPHABET)}] for a character "
        f"dataset; got {v}.")
  train_rng, val_rng = (np.random.default_rng(s)
                        for s in np.random.SeedSequence(seed).spawn(2))
  return CharDataset(
      train=sample_markov(lang, train_tokens, train_rng),
      val=sample_markov(lang, val_tokens, val_rng),
      vocab=tuple(MARKOV_ALPHABET[:v]),
      name="markov",
      entropy_floor=float(lang.entropy_rate))


# --- batches -----------------------------------------------------------------

def _check_window(num_tokens: int, batch_size: int, seq_len: int) -> None:
  advanced.check_number("batch_size", batch_size, lo=1, integer=True)
  advanced.check_number("seq_len", seq_len, lo=1, integer=True)
  if num_tokens < seq_len + 1:
    raise ValueError(
        f"a token array of length {num_tokens} is too short for windows of "
        f"seq_len + 1 = {seq_len + 1} tokens.")


def sample_batch(tokens: jax.Array, key: jax.Array, step: int | jax.Array,
                 batch_size: int, seq_len: int) -> tuple[jax.Array, jax.Array]:
  """``batch_size`` random windows of ``tokens``, a function of ``(key, step)``.

  Offsets are uniform in ``[0, N - seq_len - 1]`` from
  ``jax.random.fold_in(key, step)``; each window of ``seq_len + 1`` tokens is
  cut with ``jax.lax.dynamic_slice`` under ``vmap``, so the function is
  jittable with a traced ``step`` (``batch_size`` and ``seq_len`` static).

  Args:
    tokens: int [N] token ids.
    key: a PRNG key.
    step: the training step (int or traced int scalar).
    batch_size: windows per batch ``B``.
    seq_len: tokens per input row ``T``.

  Returns:
    ``(inputs, targets)``, each int32 [B, T], ``targets[:, t] =
    inputs[:, t + 1]`` continued by one token.

  Raises:
    ValueError: (at trace time) if ``N < seq_len + 1``.
  """
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be 1-D; got shape {tokens.shape}.")
  num_tokens = tokens.shape[0]
  _check_window(num_tokens, batch_size, seq_len)
  offsets = jax.random.randint(jax.random.fold_in(key, step), (batch_size,),
                               0, num_tokens - seq_len)
  windows = jax.vmap(
      lambda o: jax.lax.dynamic_slice(tokens, (o,), (seq_len + 1,)))(offsets)
  windows = windows.astype(jnp.int32)
  return windows[:, :-1], windows[:, 1:]


def num_eval_windows(num_tokens: int, seq_len: int) -> int:
  """How many non-overlapping windows :func:`eval_batches` can cut."""
  return max(num_tokens - 1, 0) // seq_len


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Fixed evaluation batches from the start of ``tokens`` (the val split).

  Window ``k`` has inputs ``tokens[kT : (k+1)T]`` and targets
  ``tokens[kT+1 : (k+1)T+1]``: input windows tile the prefix without overlap,
  so every target token is scored once. Batch ``b`` holds windows
  ``bB ... bB + B - 1``; as many full batches as fit, at most ``max_batches``.

  Args:
    tokens: int [N] token ids.
    batch_size: windows per batch ``B``.
    seq_len: tokens per row ``T``.
    max_batches: the most batches to return, ``>= 1``.

  Returns:
    A list of ``(inputs, targets)`` int32 [B, T] numpy pairs.

  Raises:
    ValueError: if not even one batch fits.
  """
  tokens = np.asarray(tokens).reshape(-1)
  _check_window(tokens.shape[0], batch_size, seq_len)
  advanced.check_number("max_batches", max_batches, lo=1, integer=True)
  num_batches = min(num_eval_windows(tokens.shape[0], seq_len) // batch_size,
                    max_batches)
  if num_batches == 0:
    raise ValueError(
        f"{tokens.shape[0]} tokens hold no evaluation batch of {batch_size} "
        f"windows of seq_len + 1 = {seq_len + 1} (need "
        f"{batch_size * seq_len + 1} tokens).")
  batches = []
  for b in range(num_batches):
    start = b * batch_size * seq_len
    span = tokens[start:start + batch_size * seq_len + 1].astype(np.int32)
    inputs = span[:-1].reshape(batch_size, seq_len)
    targets = span[1:].reshape(batch_size, seq_len)
    batches.append((inputs, targets))
  return batches
