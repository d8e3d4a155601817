"""`python -m d3cli.evaluation.harness ARGS`: lm-evaluation-harness's own command line with the model `d3`
registered (lm-eval discovers no plugins). Under `accelerate launch -m d3cli.evaluation.harness ...` every process
evaluates its share of the requests, as with lm-eval's `hf` model."""

import sys


def main() -> None:
    from d3cli.base.errors import UserError

    try:
        from lm_eval.__main__ import cli_evaluate

        import d3cli.evaluation.harness.model  # noqa: F401 - registers the model "d3"
    except ImportError as missing:
        sys.stderr.write(f"d3: error: lm-eval is not installed ({missing.name}): pip install 'd3cli[eval]'\n")
        sys.exit(2)
    try:
        cli_evaluate()
    except UserError as error:
        sys.stderr.write(f"d3: error: {error}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
