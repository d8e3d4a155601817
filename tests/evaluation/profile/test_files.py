import csv
import io

from d3cli.evaluation.profile.files import profile_csv


def test_the_csv_has_a_row_per_bucket_and_two_columns_per_schedule():
    bucket = {"first": 0, "last": 3, "count": 8, "mean_nll": 2.0, "nll_low": 1.5, "nll_high": 2.5, "perplexity": 7.39,
              "perplexity_low": 4.48, "perplexity_high": 12.18, "fit": None}
    profile = {"buckets": [bucket, {**bucket, "first": 4, "last": 7, "fit": 6.5}],
               "d3": [{"label": "α=0.9", "buckets": [{"mean_nll": 2.5, "nll_increase": 0.5},
                                                     {"mean_nll": 2.25, "nll_increase": 0.25}]}]}
    rows = list(csv.reader(io.StringIO(profile_csv(profile))))
    assert rows[0][-2:] == ["mean_nll α=0.9", "nll_increase α=0.9"]
    assert [row[:3] for row in rows[1:]] == [["0", "3", "8"], ["4", "7", "8"]]
    assert rows[1][9] == "" and rows[2][9] == "6.5"  # no fit for the first bucket
    assert rows[2][-2:] == ["2.25", "0.25"]
