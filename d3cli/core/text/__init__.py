"""Text in and out of a model, without the model:

    prompts.py        a prompt from standard input or an argument, through the chat template or as raw text
    detokenize.py     token ids to printable text as they come (held back at a split character or a stop string)
    d3_tokenizer.py   a model's tokenizer through the `tokenizers` library alone (what a lean start uses)
"""
