"""Fine-tuning (char-rnn's -init_from): a new run on a new text from a checkpoint's weights,
with the vocabulary extended (old ids and weights untouched) or the new symbols refused."""

import numpy as np
import pytest

import xrnn
from xrnn.cli import main
from xrnn.data import Corpus, Vocabulary, default_corpus_path
from xrnn.errors import ConfigError, VocabularyError
from xrnn.models import CharLM
from xrnn.train import LAST, Trainer, extend_vocabulary, init_from_checkpoint, train

SHAKESPEARE = open(default_corpus_path(), encoding="utf-8").read()
SMALL = dict(hidden_size=12, num_layers=1, batch_size=4, seq_len=8, val_fraction=0.0, progress=False,
             sample_every=0, eval_every=0, dtype="float64")


def host(model):
    return {k: xrnn.to_numpy(v).copy() for k, v in model.state_dict().items()}


@pytest.fixture
def base(tmp_path):
    """A trained run on 3,000 characters of Shakespeare, and its checkpoint."""
    text = tmp_path / "base.txt"
    text.write_text(SHAKESPEARE[:3000], encoding="utf-8")
    t = train(text, steps=3, out_dir=tmp_path / "base", seed=0, **SMALL)
    return t, tmp_path / "base" / LAST


def test_a_new_run_starts_from_the_checkpoints_weights_exactly(tmp_path, base):
    old, ckpt = base
    new_text = tmp_path / "new.txt"
    words = "".join(c for c in SHAKESPEARE[5000:8000] if c in old.model.vocab)  # no character outside it
    new_text.write_text(words, encoding="utf-8")
    t = train(new_text, steps=0, init_from=ckpt, out_dir=tmp_path / "ft", seed=3,
              **{k: v for k, v in SMALL.items() if k not in ("hidden_size", "num_layers", "dtype")})
    assert t.step == 0  # a new optimizer: no moments carried over
    assert all(not np.any(xrnn.to_numpy(a)) for slots in t.optimizer.state.values() for a in slots.values())
    assert t.model.vocab == old.model.vocab and t.model.config == old.model.config
    w0, w1 = host(old.model), host(t.model)
    for k in w0:
        np.testing.assert_array_equal(w1[k], w0[k], err_msg=k)
    # the new corpus, in the checkpoint's ids
    ids = np.asarray(t.corpus.ids)
    assert t.corpus.vocab.decode(ids) == words
    assert t.fit(2).step == 2  # a new run: steps count from 0 on the new text
    assert t.train_losses and len(t.train_losses) == 2
    # and from Python with a Trainer
    model, corpus = init_from_checkpoint(ckpt, new_text, seed=3)
    for k, v in host(model).items():
        np.testing.assert_array_equal(v, w0[k], err_msg=k)
    assert Trainer(model, corpus, batch_size=4, seq_len=8, progress=False, val_fraction=0.0).fit(1).step == 1


@pytest.mark.parametrize("embedding_dim", [None, 5])
def test_extending_the_vocabulary_keeps_old_ids_and_rows_bit_for_bit(embedding_dim):
    old_vocab = Vocabulary(sorted(set("hello world")))
    model = CharLM(len(old_vocab), 10, 2, cell="gru", embedding_dim=embedding_dim, dtype="float64", seed=4,
                   vocab=old_vocab)
    new_tokens = ["!", "Z", "é"]
    vocab = Vocabulary(old_vocab.tokens + new_tokens)
    ext = extend_vocabulary(model, vocab, seed=9)
    V, V2 = len(old_vocab), len(vocab)
    assert ext.vocab_size == V2 and ext.vocab is vocab
    assert [vocab.id(t) for t in old_vocab.tokens] == list(range(V))
    fresh = host(CharLM(V2, 10, 2, cell="gru", embedding_dim=embedding_dim, dtype="float64", seed=9))
    a, b = host(model), host(ext)
    for k in a:
        if k in ("embedding.weight", "head.weight", "head.bias"):
            np.testing.assert_array_equal(b[k][:V], a[k], err_msg=k)
            np.testing.assert_array_equal(b[k][V:], fresh[k][V:], err_msg=k)  # as a new model draws them
        elif k == "rnn.weight_ih_l0" and embedding_dim is None:
            np.testing.assert_array_equal(b[k][:, :V], a[k])
            np.testing.assert_array_equal(b[k][:, V:], fresh[k][:, V:])
        else:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    # predictions on text of old symbols only: the old ids' logits are unchanged
    ids = xrnn.to_device(old_vocab.encode("hello world hello!"[:18].replace("!", "o")).reshape(2, 9), model.device)
    with xrnn.no_grad():
        la, _ = model.eval()(ids)
        lb, _ = ext.eval()(ids)
    la, lb = xrnn.to_numpy(la), xrnn.to_numpy(lb)
    assert lb.shape == (2, 9, V2)
    np.testing.assert_allclose(lb[..., :V], la, rtol=1e-13, atol=1e-13)
    with pytest.raises(ConfigError, match="starts with the model's own tokens"):
        extend_vocabulary(model, Vocabulary(new_tokens + old_vocab.tokens))


def test_new_symbols_are_refused_with_a_list_or_added_with_extend_vocab(tmp_path, base, capsys):
    old, ckpt = base
    extra = "€ñ#@^~{}|<>" + "QZXJ"
    new_text = tmp_path / "new.txt"
    new_text.write_text(SHAKESPEARE[:2000] + extra * 40, encoding="utf-8")
    outside = sorted(set(extra) - set(old.model.vocab.tokens))
    assert len(outside) > 8
    with pytest.raises(VocabularyError) as e:
        init_from_checkpoint(ckpt, new_text)
    msg = str(e.value)
    assert f"has {len(outside)} characters outside the vocabulary of {str(ckpt)!r}" in msg
    assert ", ".join(repr(c) for c in outside[:8]) + f", ... ({len(outside)} in all)" in msg
    assert "extend_vocab=True" in msg
    # the command line says it in flags, on one line
    args = ["train", str(new_text), "--init-from", str(ckpt), "--out", str(tmp_path / "cli"), "--steps", "2",
            "--batch-size", "4", "--seq-len", "8", "--progress", "off", "--sample-every", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xrnn: error: ") and "\n" not in err and "pass --extend-vocab to add them" in err
    # one missing character: singular
    one = tmp_path / "one.txt"
    one.write_text(SHAKESPEARE[:2000] + "€", encoding="utf-8")
    with pytest.raises(VocabularyError, match="has 1 character outside the vocabulary .*: '€'; pass"):
        init_from_checkpoint(ckpt, one)

    assert main([*args, "--extend-vocab"]) == 0
    ft = xrnn.load(tmp_path / "cli" / LAST)
    V = len(old.model.vocab)
    assert ft.model.vocab.tokens[:V] == old.model.vocab.tokens and ft.model.vocab.tokens[V:] == outside
    assert ft.step == 2
    # the fine-tuned run resumes: its text is read again in the extended vocabulary's ids
    assert main(["train", str(new_text), "--out", str(tmp_path / "cli"), "--resume", "--steps", "3",
                 "--progress", "off"]) == 0
    assert xrnn.load(tmp_path / "cli" / LAST).step == 3


def test_options_that_contradict_the_checkpoint_are_refused(tmp_path, base, capsys):
    old, ckpt = base
    with pytest.raises(ConfigError, match=r"hidden_size=32 \(the checkpoint has 12\)"):
        train(None, steps=1, init_from=ckpt, hidden_size=32, progress=False)
    with pytest.raises(ConfigError, match="give one of them"):
        train(None, steps=1, init_from=ckpt, resume=True, out_dir=tmp_path / "base")
    with pytest.raises(ConfigError, match="extend_vocab=True applies to init_from"):
        train(None, steps=1, extend_vocab=True)
    assert main(["train", "--init-from", str(ckpt), "--model", "gru", "--num-layers", "1",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--model gru (the checkpoint has 'lstm')" in err and "--num-layers" not in err
    assert "init_from" not in err and "--init-from" in err
    assert not (tmp_path / "x").exists()


def test_an_in_memory_corpus_is_renumbered_into_the_checkpoints_ids(base):
    old, ckpt = base
    c = Corpus.from_text("to be or not to be")
    model, corpus = init_from_checkpoint(ckpt, c, seed=0)
    assert corpus.vocab is model.vocab and corpus.vocab.decode(corpus.ids) == "to be or not to be"
