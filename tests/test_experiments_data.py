"""Tests for ``ebc_optax.experiments.data``; none of them touches the network."""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ebc_optax.experiments import data

SHARED_SHAKESPEARE = (pathlib.Path(__file__).resolve().parents[2] / "shared"
                      / "data" / "tinyshakespeare.txt")
needs_shakespeare = pytest.mark.skipif(
    not SHARED_SHAKESPEARE.is_file(),
    reason=f"tiny Shakespeare not found at {SHARED_SHAKESPEARE} (tests never "
           "download it)")

SHAKESPEARE_CHARS = 1_115_394


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
  """No EBC_OPTAX_DATA, and a cache default inside tmp_path."""
  monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

  def no_network(url, dest):
    raise AssertionError(f"unexpected download of {url}")

  monkeypatch.setattr(data, "_fetch", no_network)
  return tmp_path


# --- tiny Shakespeare --------------------------------------------------------

def _check_shakespeare(ds):
  assert ds.name == "shakespeare"
  assert ds.entropy_floor is None
  assert ds.vocab_size == 65 == len(ds.vocab)
  assert list(ds.vocab) == sorted(ds.vocab)
  assert ds.train.dtype == np.int32 and ds.val.dtype == np.int32
  assert len(ds.train) + len(ds.val) == SHAKESPEARE_CHARS
  assert len(ds.train) == int(SHAKESPEARE_CHARS * 0.9)
  assert data.decode(ds.train[:14], ds.vocab) == "First Citizen:"


@needs_shakespeare
@pytest.mark.parametrize("form", ["file", "directory"])
def test_shakespeare_via_env(clean_env, monkeypatch, form):
  target = SHARED_SHAKESPEARE if form == "file" else SHARED_SHAKESPEARE.parent
  monkeypatch.setenv(data.DATA_ENV_VAR, str(target))
  assert data.shakespeare_path(download=False) == SHARED_SHAKESPEARE
  assert data.sha256_of(SHARED_SHAKESPEARE) == data.SHAKESPEARE_SHA256
  _check_shakespeare(data.load_shakespeare())


@needs_shakespeare
def test_shakespeare_corrupted_copy_raises(clean_env, monkeypatch):
  bad = clean_env / "tinyshakespeare.txt"
  raw = bytearray(SHARED_SHAKESPEARE.read_bytes())
  raw[100] ^= 1
  bad.write_bytes(bytes(raw))
  monkeypatch.setenv(data.DATA_ENV_VAR, str(clean_env))
  with pytest.raises(ValueError, match="sha256") as info:
    data.shakespeare_path()
  message = str(info.value)
  assert data.SHAKESPEARE_SHA256 in message and str(bad) in message
  # A corrupted file in the cache is rejected as well.
  monkeypatch.delenv(data.DATA_ENV_VAR)
  with pytest.raises(ValueError, match="sha256"):
    data.shakespeare_path(clean_env)


def test_env_pointing_nowhere_raises(clean_env, monkeypatch):
  monkeypatch.setenv(data.DATA_ENV_VAR, str(clean_env / "missing.txt"))
  with pytest.raises(FileNotFoundError, match=data.DATA_ENV_VAR):
    data.shakespeare_path()


@needs_shakespeare
def test_shakespeare_download_caches(clean_env, monkeypatch):
  calls = []

  def fake_fetch(url, dest):
    calls.append((url, pathlib.Path(dest)))
    shutil.copyfile(SHARED_SHAKESPEARE, dest)

  monkeypatch.setattr(data, "_fetch", fake_fetch)
  cache = clean_env / "cache"
  path = data.shakespeare_path(cache)
  assert path == cache / data.SHAKESPEARE_FILENAME and path.is_file()
  assert len(calls) == 1 and calls[0][0] == data.SHAKESPEARE_URL
  assert calls[0][1].parent == cache and calls[0][1] != path
  assert sorted(p.name for p in cache.iterdir()) == [data.SHAKESPEARE_FILENAME]
  _check_shakespeare(data.load_shakespeare(cache))
  assert data.shakespeare_path(cache, download=False) == path
  assert len(calls) == 1  # Served from the cache.


def test_default_cache_dir_download(clean_env, monkeypatch):
  fetched = []
  monkeypatch.setattr(data, "_fetch", lambda url, dest: fetched.append(dest))
  # An empty download has the wrong hash; it shows where the default cache is.
  with pytest.raises(ValueError, match="sha256"):
    data.shakespeare_path()
  assert pathlib.Path(fetched[0]).parent == clean_env / "xdg" / "ebc_optax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert data.default_cache_dir() == pathlib.Path.home() / ".cache" / "ebc_optax"


def test_download_with_wrong_bytes_leaves_nothing(clean_env, monkeypatch):
  monkeypatch.setattr(
      data, "_fetch", lambda url, dest: pathlib.Path(dest).write_bytes(b"nope"))
  cache = clean_env / "cache"
  with pytest.raises(ValueError, match="sha256") as info:
    data.shakespeare_path(cache)
  assert data.SHAKESPEARE_SHA256 in str(info.value)
  assert list(cache.iterdir()) == []


def test_failed_fetch_leaves_nothing(clean_env, monkeypatch):
  def broken_fetch(url, dest):
    pathlib.Path(dest).write_bytes(b"partial")
    raise OSError("connection reset")

  monkeypatch.setattr(data, "_fetch", broken_fetch)
  cache = clean_env / "cache"
  with pytest.raises(OSError, match="connection reset"):
    data.shakespeare_path(cache)
  assert list(cache.iterdir()) == []


def test_no_download_without_file_raises(clean_env):
  with pytest.raises(FileNotFoundError, match=data.DATA_ENV_VAR):
    data.shakespeare_path(clean_env / "cache", download=False)
  with pytest.raises(FileNotFoundError, match=data.DATA_ENV_VAR):
    data.load_shakespeare(clean_env / "cache", download=False)


# --- text helpers ------------------------------------------------------------

def test_encode_decode_round_trip():
  text = "Hello, wörld! ünïcode ✓ — 😀\n\tend"
  vocab = tuple(sorted(set(text)))
  ids = data.encode(text, vocab)
  assert ids.dtype == np.int32 and ids.shape == (len(text),)
  assert data.decode(ids, vocab) == text
  assert [vocab[i] for i in ids] == list(text)
  # An unsorted vocab works too.
  shuffled = tuple(reversed(vocab))
  assert data.decode(data.encode(text, shuffled), shuffled) == text
  assert data.encode("", vocab).shape == (0,) and data.decode([], vocab) == ""


def test_encode_decode_errors():
  with pytest.raises(ValueError, match="not in the vocab"):
    data.encode("abz", ("a", "b"))
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    data.decode([0, 2], ("a", "b"))
  with pytest.raises(ValueError, match="single characters"):
    data.encode("ab", ("ab",))


def test_vocab_json_round_trip(tmp_path):
  vocab = ("\n", " ", "A", "é", "✓", "😀", '"', "\\")
  path = tmp_path / "vocab.json"
  data.save_vocab(vocab, path)
  assert data.load_vocab(path) == vocab
  path.write_text('["a", "bc"]')
  with pytest.raises(ValueError, match="vocab.json"):
    data.load_vocab(path)
  path.write_text("not json")
  with pytest.raises(ValueError, match="vocab.json"):
    data.load_vocab(path)


def test_text_dataset_split():
  text = "abcdefghij" * 10
  ds = data.text_dataset(text, "letters")
  assert ds.vocab == tuple("abcdefghij") and ds.name == "letters"
  assert len(ds.train) == 90 and len(ds.val) == 10
  assert data.decode(np.concatenate([ds.train, ds.val]), ds.vocab) == text
  ds = data.text_dataset(text, "letters", val_fraction=0.25)
  assert len(ds.train) == 75 and len(ds.val) == 25


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5])
def test_text_dataset_bad_val_fraction(val_fraction):
  with pytest.raises(ValueError, match="val_fraction"):
    data.text_dataset("abcdefghij" * 10, "x", val_fraction)


@pytest.mark.parametrize("text", ["", "abc"])
def test_text_dataset_too_short(text):
  with pytest.raises(ValueError):
    data.text_dataset(text, "x")


def test_load_text_file_utf8(tmp_path):
  text = "Größe, naïve café — ✓\r\nzweite Zeile 😀\n" * 3
  path = tmp_path / "small.txt"
  path.write_bytes(text.encode("utf-8"))
  ds = data.load_text_file(path, val_fraction=0.2)
  assert ds.name == "small" and ds.entropy_floor is None
  assert ds.vocab == tuple(sorted(set(text)))
  assert data.decode(np.concatenate([ds.train, ds.val]), ds.vocab) == text
  assert len(ds.train) == int(len(text) * 0.8)


def test_load_text_file_invalid_utf8(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("Größe".encode("latin-1") * 10)
  with pytest.raises(ValueError, match="UTF-8") as info:
    data.load_text_file(path)
  assert str(path) in str(info.value)


def test_load_text_file_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    data.load_text_file(tmp_path / "missing.txt")


# --- Markov language ---------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {},
    {"seed": 3, "vocab_size": 12, "support": 2, "concentration": 0.3},
    {"seed": 1, "vocab_size": 90, "support": 6, "concentration": 2.0},
])
def test_markov_language_structure(kwargs):
  lang = data.markov_language(**kwargs)
  p, pi = lang.transition, lang.stationary
  v = kwargs.get("vocab_size", 32)
  assert p.shape == (v, v) and p.dtype == np.float64 and lang.vocab_size == v
  np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
  assert np.all((p > 0).sum(axis=1) == kwargs.get("support", 4))
  np.testing.assert_allclose(pi @ p, pi, rtol=0, atol=1e-12)
  assert np.all(pi > 0) and abs(pi.sum() - 1) < 1e-12
  # Irreducible and aperiodic: P^k converges to rows equal to π.
  np.testing.assert_allclose(np.linalg.matrix_power(p, 4096),
                             np.tile(pi, (v, 1)), rtol=0, atol=1e-8)
  h_rows = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), 1)
  assert lang.entropy_rate == pytest.approx(float(pi @ h_rows), rel=1e-12)
  assert 0 < lang.entropy_rate <= np.log(kwargs.get("support", 4))


def test_markov_language_deterministic():
  a, b = data.markov_language(seed=5), data.markov_language(seed=5)
  np.testing.assert_array_equal(a.transition, b.transition)
  assert a.entropy_rate == b.entropy_rate
  assert not np.array_equal(a.transition,
                            data.markov_language(seed=6).transition)


def test_markov_support_one_is_a_cycle():
  lang = data.markov_language(vocab_size=5, support=1)
  np.testing.assert_array_equal(lang.transition, np.roll(np.eye(5), 1, axis=1))
  np.testing.assert_allclose(lang.stationary, 0.2)
  assert lang.entropy_rate == 0.0


@pytest.mark.parametrize("kwargs, name", [
    ({"vocab_size": 1}, "vocab_size"),
    ({"vocab_size": 2.5}, "vocab_size"),
    ({"support": 0}, "support"),
    ({"vocab_size": 8, "support": 9}, "support"),
    ({"concentration": 0.0}, "concentration"),
    ({"seed": -1}, "seed"),
])
def test_markov_language_validation(kwargs, name):
  with pytest.raises(ValueError, match=name):
    data.markov_language(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {},
    {"seed": 2, "vocab_size": 20, "support": 3, "concentration": 0.5},
])
def test_markov_entropy_rate_matches_monte_carlo(kwargs):
  lang = data.markov_language(**kwargs)
  ds = data.markov_dataset(lang, train_tokens=200_000, val_tokens=2, seed=0)
  x = ds.train
  probs = lang.transition[x[:-1], x[1:]]
  assert np.all(probs > 0)  # Only transitions of the table occur.
  estimate = float(np.mean(-np.log(probs)))
  assert estimate == pytest.approx(lang.entropy_rate, rel=0.02)
  # The empirical state frequencies approach the stationary distribution.
  freq = np.bincount(x, minlength=lang.vocab_size) / len(x)
  np.testing.assert_allclose(freq, lang.stationary, atol=0.01)


def test_markov_dataset():
  lang = data.markov_language(vocab_size=40)
  ds = data.markov_dataset(lang, train_tokens=1000, val_tokens=300, seed=7)
  assert ds.name == "markov" and ds.entropy_floor == lang.entropy_rate
  assert ds.vocab_size == 40 and len(set(ds.vocab)) == 40
  assert ds.vocab[:3] == ("a", "b", "c") and ds.vocab[26] == "A"
  assert ds.train.shape == (1000,) and ds.val.shape == (300,)
  assert ds.train.dtype == np.int32 and ds.val.dtype == np.int32
  assert ds.train.max() < 40 and ds.train.min() >= 0
  again = data.markov_dataset(lang, train_tokens=1000, val_tokens=300, seed=7)
  np.testing.assert_array_equal(ds.train, again.train)
  np.testing.assert_array_equal(ds.val, again.val)
  other = data.markov_dataset(lang, train_tokens=1000, val_tokens=300, seed=8)
  assert not np.array_equal(ds.train, other.train)
  assert not np.array_equal(ds.train[:300], ds.val)
  # The characters round-trip through the text helpers.
  text = data.decode(ds.val, ds.vocab)
  np.testing.assert_array_equal(data.encode(text, ds.vocab), ds.val)


def test_markov_dataset_validation():
  with pytest.raises(ValueError, match="train_tokens"):
    data.markov_dataset(data.markov_language(), 1, 10, seed=0)
  big = data.MarkovLanguage(np.eye(91), np.full(91, 1 / 91), 0.0)
  with pytest.raises(ValueError, match="90"):
    data.markov_dataset(big, 10, 10, seed=0)


# --- batches -----------------------------------------------------------------

def test_sample_batch_windows():
  n, b, t = 1000, 6, 16
  key = jax.random.PRNGKey(0)
  positions = jnp.arange(n, dtype=jnp.int32)
  inputs, targets = data.sample_batch(positions, key, 3, b, t)
  assert inputs.shape == targets.shape == (b, t)
  assert inputs.dtype == jnp.int32 and targets.dtype == jnp.int32
  inputs, targets = np.asarray(inputs), np.asarray(targets)
  offsets = inputs[:, 0]
  assert np.all(offsets >= 0) and np.all(offsets + t + 1 <= n)
  np.testing.assert_array_equal(inputs, offsets[:, None] + np.arange(t))
  np.testing.assert_array_equal(targets, inputs + 1)
  # The same offsets cut the same windows out of any array of that length.
  tokens = np.random.default_rng(0).integers(0, 50, n).astype(np.int32)
  x, y = data.sample_batch(jnp.asarray(tokens), key, 3, b, t)
  windows = tokens[offsets[:, None] + np.arange(t + 1)]
  np.testing.assert_array_equal(np.asarray(x), windows[:, :-1])
  np.testing.assert_array_equal(np.asarray(y), windows[:, 1:])


def test_sample_batch_deterministic_per_step():
  tokens = jnp.arange(5000, dtype=jnp.int32)
  key = jax.random.PRNGKey(1)
  a = data.sample_batch(tokens, key, 4, 8, 10)
  b = data.sample_batch(tokens, key, 4, 8, 10)
  c = data.sample_batch(tokens, key, 5, 8, 10)
  d = data.sample_batch(tokens, jax.random.PRNGKey(2), 4, 8, 10)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])
  assert not np.array_equal(a[0], d[0])


def test_sample_batch_jit_traced_step_compiles_once():
  tokens = jnp.arange(300, dtype=jnp.int32)
  key = jax.random.PRNGKey(0)
  traces = []

  @jax.jit
  def batch(step):
    traces.append(None)
    return data.sample_batch(tokens, key, step, 4, 8)

  for step in range(5):
    x, y = batch(jnp.asarray(step, jnp.int32))
    ex, ey = data.sample_batch(tokens, key, step, 4, 8)
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)
  assert len(traces) == 1


def test_sample_batch_too_short():
  with pytest.raises(ValueError, match="too short"):
    data.sample_batch(jnp.arange(8, dtype=jnp.int32), jax.random.PRNGKey(0),
                      0, 2, 8)
  with pytest.raises(ValueError, match="too short"):
    jax.jit(lambda s: data.sample_batch(jnp.arange(8), jax.random.PRNGKey(0),
                                        s, 2, 8))(0)
  # Exactly seq_len + 1 tokens is enough: the only window is the whole array.
  x, y = data.sample_batch(jnp.arange(9), jax.random.PRNGKey(0), 0, 2, 8)
  np.testing.assert_array_equal(x, np.tile(np.arange(8), (2, 1)))
  np.testing.assert_array_equal(y, np.tile(np.arange(1, 9), (2, 1)))


def test_eval_batches():
  tokens = np.arange(1000, dtype=np.int32)
  batches = data.eval_batches(tokens, batch_size=4, seq_len=10, max_batches=100)
  # (1000 - 1) // 10 = 99 windows -> 24 full batches of 4.
  assert len(batches) == 24
  starts = []
  for inputs, targets in batches:
    assert inputs.shape == targets.shape == (4, 10)
    assert inputs.dtype == np.int32
    np.testing.assert_array_equal(targets, inputs + 1)
    starts.extend(inputs[:, 0].tolist())
  # Consecutive, non-overlapping input windows from the start of the split.
  assert starts == list(range(0, 960, 10))
  flat = np.concatenate([x.reshape(-1) for x, _ in batches])
  assert len(set(flat.tolist())) == flat.size
  assert len(data.eval_batches(tokens, 4, 10, max_batches=5)) == 5
  assert len(data.eval_batches(tokens[:41], 4, 10, max_batches=5)) == 1
  again = data.eval_batches(tokens, 4, 10, max_batches=100)
  assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again))


def test_eval_batches_too_short():
  with pytest.raises(ValueError, match="no evaluation batch"):
    data.eval_batches(np.arange(40), batch_size=4, seq_len=10, max_batches=3)
  with pytest.raises(ValueError, match="max_batches"):
    data.eval_batches(np.arange(400), batch_size=4, seq_len=10, max_batches=0)
