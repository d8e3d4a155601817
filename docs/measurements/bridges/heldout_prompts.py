"""Held-out prompts for scoring bridges on the model's own replies: never used for calibration."""
CHAT = [
    "Why is the sky blue?",
    "How do I get red wine out of a carpet?",
    "Explain how a bicycle's gears make climbing hills easier.",
    "What are black holes?",
    "Write a Python function that returns the largest prime factor of a number.",
    "A bakery sells 48 muffins in the morning and a third as many in the afternoon. How many muffins does it sell in all?",
    "Write a haiku about a quiet harbour.",
    "What should I consider when choosing a laptop for university?",
    "Explain the difference between a virus and a bacterium.",
    "Give me three ideas for a rainy Sunday with children.",
    "How does compound interest work? Give an example.",
    "Write a short letter of complaint about a late delivery.",
    "What happened during the French Revolution, briefly?",
    "How do I center a div in CSS?",
    "Why do we have leap years?",
    "List the planets of the solar system and one fact about each.",
    "A car uses 6 litres of fuel per 100 km. How much fuel does it need for 350 km?",
    "What makes a good team leader?",
]
RAW = [
    "Q: Mary has 5 apples and gives 2 to John. John then has 7 apples. How many did John have before?\n"
    "A: Let's think step by step.",
    "The first telephone call was made in",
    "Q: Today is Friday. What day was it 4 days ago?\nA: Let's think step by step.",
    "Welcome to the annual report of the",
    "It was late in the evening when the detective",
    "import os\n\ndef list_python_files(folder):\n",
]
