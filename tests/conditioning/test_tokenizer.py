"""The CLIP tokenizer against transformers' on awkward prompts, over-long prompts cut with a warning, and its folders
(transformers 4's vocab.json + merges.txt, transformers 5's tokenizer.json)."""

import pytest
import torch

from latent_diffusion.conditioning import ClipTokenizer

AWKWARD_PROMPTS = [
    "A photo of an astronaut, riding a horse!!! on Mars...",
    "3.14159 apples, 2024-01-01 & #42 (100%)",
    "Café naïve résumé — façade, ŞİŞLİ, e\u0301",
    "😀🐶🔥 emoji party 👍🏽",
    "東京の夜景 and 北京烤鸭",
    "  multiple    spaces\tand\nnewlines  ",
    "it's the dog's toy, isn't it? we'll see; they've gone, I'd say ''quoted''",
    "",
]


@pytest.fixture(scope="module")
def hf_clip_tokenizer(clip_tokenizer, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    clip_tokenizer.save_folder(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.model_max_length = 77
    return tokenizer


def hf_ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids


def test_tokenizer_matches_transformers_on_awkward_prompts(clip_tokenizer, hf_clip_tokenizer):
    for prompt in AWKWARD_PROMPTS:
        assert clip_tokenizer([prompt]).tolist() == hf_ids(hf_clip_tokenizer, [prompt]).tolist(), prompt


def test_overlong_prompt_is_cut_to_77_with_a_warning_counting_the_cut_tokens(clip_tokenizer, hf_clip_tokenizer):
    prompt = " ".join(["cat", "dog"] * 40)  # 80 tokens: 75 fit between the start and end tokens
    with pytest.warns(UserWarning, match="5 tokens were cut"):
        ids = clip_tokenizer([prompt])
    assert ids.shape == (1, 77) and ids[0, -1].item() == clip_tokenizer.end_id
    assert torch.equal(ids, hf_ids(hf_clip_tokenizer, [prompt]))


def test_empty_prompt_is_start_end_then_end_token_padding(clip_tokenizer):
    ids = clip_tokenizer([""])
    assert ids[0, :2].tolist() == [49406, 49407] and (ids[0, 2:] == 49407).all()


def test_tokenizer_folder_round_trip(clip_tokenizer, tmp_path):
    clip_tokenizer.save_folder(tmp_path)
    again = ClipTokenizer.from_folder(tmp_path)
    assert torch.equal(again(AWKWARD_PROMPTS), clip_tokenizer(AWKWARD_PROMPTS))
    assert clip_tokenizer.decode(clip_tokenizer.encode("A Photo, of 2 cats!")) == "a photo , of 2 cats !"


def test_tokenizer_reads_the_tokenizer_json_that_transformers_saves(hf_clip_tokenizer, tmp_path):
    """transformers 5's CLIPTokenizer.save_pretrained writes tokenizer.json alone: the ids read from it are theirs."""
    hf_clip_tokenizer.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt"):  # what transformers 4 writes besides: test the tokenizer.json alone
        (tmp_path / name).unlink(missing_ok=True)
    ours = ClipTokenizer.from_folder(tmp_path)
    prompts = AWKWARD_PROMPTS + ["A PHOTO of an Astronaut, Riding a HORSE!!! (4K, HDR) -- on MARS?!",
                                 " ".join(["Cat,", "DOG;"] * 40)]  # 160 tokens: cut to 75
    with pytest.warns(UserWarning, match="85 tokens were cut"):
        assert torch.equal(ours(prompts), hf_ids(hf_clip_tokenizer, prompts))


def test_tokenizer_folder_without_a_vocabulary_names_the_files_it_accepts(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"holds tokenizer_config.json: expected vocab.json with merges.txt "
                                                 r"\(what transformers 4 saves\) or tokenizer.json"):
        ClipTokenizer.from_folder(tmp_path)
