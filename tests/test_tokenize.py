"""Response masks token by token, EOS kept as a label with pad == eos, truncation counted."""

import pytest

from alignkit.config import DataConfig
from alignkit.data.collate import collate_pairs, collate_sft
from alignkit.data.formats import PreferenceExample, SFTExample
from alignkit.data.load import DataError, DataReport
from alignkit.data.tokenize import Encoder
from alignkit.testing import tiny_tokenizer


def labelled(tok, item):
    return "".join(tok.convert_ids_to_tokens(t) for t, m in zip(item["input_ids"], item["loss_mask"]) if m)


def test_plain_prompt_completion_mask(tiny_tok):
    enc = Encoder(tiny_tok, DataConfig())
    rep = DataReport()
    (item,) = enc.encode("sft", [SFTExample(1, prompt="Q:", completion="ab")], rep)
    toks = tiny_tok.convert_ids_to_tokens(item["input_ids"])
    assert toks == ["Q", ":", "a", "b", "<|im_end|>"]
    assert item["loss_mask"] == [0, 0, 1, 1, 1]  # EOS is a label although pad == eos
    assert tiny_tok.pad_token_id == tiny_tok.eos_token_id


def test_chat_mask_every_assistant_turn(tiny_tok):
    enc = Encoder(tiny_tok, DataConfig())
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "y"}, {"role": "assistant", "content": "BC"}]
    (item,) = enc.encode("sft", [SFTExample(1, messages=msgs)], DataReport())
    text = "".join(tiny_tok.convert_ids_to_tokens(item["input_ids"]))
    assert text == ("<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
                    "<|im_start|>user\ny<|im_end|>\n<|im_start|>assistant\nBC<|im_end|>")
    assert labelled(tiny_tok, item) == "A<|im_end|>BC<|im_end|>"


def test_chat_template_always_wraps_plain_prompt(tiny_tok):
    enc = Encoder(tiny_tok, DataConfig(chat_template="always"))
    (item,) = enc.encode("sft", [SFTExample(1, prompt="hi", completion="yo")], DataReport())
    assert "".join(tiny_tok.convert_ids_to_tokens(item["input_ids"])).startswith("<|im_start|>user\nhi")
    assert labelled(tiny_tok, item) == "yo<|im_end|>"


def test_no_chat_template_is_a_clear_error():
    tok = tiny_tokenizer(chat_template=None)
    enc = Encoder(tok, DataConfig())
    with pytest.raises(DataError, match="needs a chat template.*model.chat_template"):
        enc.encode("sft", [SFTExample(1, messages=[{"role": "user", "content": "a"},
                                                   {"role": "assistant", "content": "b"}])], DataReport())


def test_preference_collate_masks_exact(tiny_tok):
    enc = Encoder(tiny_tok, DataConfig())
    items = enc.encode("preference", [PreferenceExample(1, "P", "ab", "c"), PreferenceExample(2, "PP", "d", "efg")],
                       DataReport())
    b = collate_pairs(items, tiny_tok.pad_token_id)
    # rows: "Pab<e>" (4), "PPd<e>" (4), "Pc<e>" (3), "PPefg<e>" (6) -> T = 6
    assert b.seq.input_ids.shape == (4, 6)
    assert b.seq.attention_mask.sum(-1).tolist() == [4, 4, 3, 6]
    assert b.seq.loss_mask.tolist() == [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0],
                                        [0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]]


def test_truncation_counted_prompt_left_then_response(tiny_tok):
    cfg = DataConfig(max_length=8, max_prompt_length=3)
    enc = Encoder(tiny_tok, cfg)
    rep = DataReport()
    (item,) = enc.encode("sft", [SFTExample(7, prompt="abcdef", completion="xyz123")], rep)
    # prompt cut from the left to 3 ("def"), response cut to the 5 tokens left ("xyz12"), no EOS
    assert "".join(tiny_tok.convert_ids_to_tokens(item["input_ids"])) == "defxyz12"
    assert item["loss_mask"] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert rep.n_truncated == 1 and rep.samples[0]["row"] == 7


def test_truncation_drop_policy_counts(tiny_tok):
    enc = Encoder(tiny_tok, DataConfig(max_length=4, truncation="drop"))
    rep = DataReport()
    out = enc.encode("sft", [SFTExample(1, prompt="a", completion="b"), SFTExample(2, prompt="abc", completion="de")], rep)
    assert len(out) == 1 and rep.n_dropped == 1
    assert rep.samples[0] == {"what": "dropped", "file": "", "row": 2, "reason": "longer than data.max_length=4"}


def test_sft_collate_right_pads(tiny_tok):
    enc = Encoder(tiny_tok, DataConfig())
    items = enc.encode("sft", [SFTExample(1, prompt="a", completion="b"), SFTExample(2, prompt="a", completion="bcd")],
                       DataReport())
    b = collate_sft(items, tiny_tok.pad_token_id)
    assert b.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b.loss_mask.tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert b.num_label_tokens == 6
