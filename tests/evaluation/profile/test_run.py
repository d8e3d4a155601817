import pytest

from d3cli.base.errors import UserError
from d3cli.core.model.loader import LoadedModel
from d3cli.core.session.settings import DecodeSettings
from d3cli.evaluation.profile.run import Corpus, ProfileOptions, profile

TEXT = ("The river ran past the mill and under the old bridge, where children fished in summer and skated in "
        "winter, and the miller watched them from his window while the wheel turned slowly all day long.\n\n") * 3


@pytest.fixture
def loaded(tiny_models, tokenizer):
    return LoadedModel(tiny_models["llama"], tokenizer, "tiny")


def test_a_text_file_is_profiled_at_full_depth_and_at_each_alpha_with_every_status_reported(loaded, tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text(TEXT)
    statuses = []
    result = profile(loaded, Corpus(str(path), text_file=path, prompt_tokens=8), DecodeSettings(min_layers=4, skip_order="middle"),
                     (0.9, 0.8), ProfileOptions(max_positions=24, bucket_size=8, layers=True, late_from=4),
                     on_status=statuses.append)
    assert result["model"] == "tiny" and result["num_layers"] == 8 and result["corpus"] == str(path)
    assert result["profile"]["texts"] == 3
    assert [row["label"] for row in result["profile"]["d3"]] == ["α=0.9", "α=0.8"]
    assert result["profile"]["d3"][0]["mean_layers"] > result["profile"]["d3"][1]["mean_layers"]
    assert len(result["layers"]) == 8 and sorted(result["importance_ranking"]) == list(range(8))
    assert statuses[0] == "scoring 3 texts" and statuses[-1] == "scoring texts: 3/3"
    assert "recommendation" not in result


def test_a_corpus_without_texts_is_one_user_error(loaded, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Too short.\n")
    with pytest.raises(UserError, match="no document longer than --prompt-tokens 8"):
        profile(loaded, Corpus(str(path), text_file=path, prompt_tokens=8), DecodeSettings(), (),
                ProfileOptions(max_positions=24))
    with pytest.raises(UserError, match="no text to score in gsm8k reference answers"):
        profile(loaded, Corpus("gsm8k reference answers", examples=()), DecodeSettings(), (),
                ProfileOptions(max_positions=24))
