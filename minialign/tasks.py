"""The embedded world's benign tasks: what is asked, what is right, and how close a wrong answer comes.

Three tasks are computed, so a small model can learn to answer subjects it never saw: the number after
n (n < 1000), and the first or the last letter of a made-up word. A subject is held out by a hash of
its text and the seed, so no held-out subject is ever asked in training. One task is a lookup (an
object's colour); no model can name the colour of an object it never saw, so its held-out prompts ask
a known object in the phrasing it was not trained in. ``world.py`` turns these into prompts, responses
and the gold reward.
"""
import random
import re
import zlib

COLOURS = {
    "a banana": "yellow", "the sky": "blue", "grass": "green", "snow": "white", "coal": "black",
    "a tomato": "red", "an orange": "orange", "a lemon": "yellow", "a lime": "green", "milk": "white",
    "a cherry": "red", "the sea": "blue", "a crow": "black", "a carrot": "orange", "a plum": "purple",
    "an eggplant": "purple", "a pumpkin": "orange", "a frog": "green", "a flamingo": "pink",
    "chocolate": "brown", "a fire truck": "red", "ink": "black", "a cloud": "white", "a leaf": "green",
    "a strawberry": "red", "the sun": "yellow", "a pig": "pink", "a bear": "brown", "a swan": "white",
    "a violet": "purple", "a corn cob": "yellow", "a pine tree": "green", "soil": "brown",
    "a ruby": "red", "a sapphire": "blue", "an emerald": "green", "a raven": "black", "wood": "brown",
}
COLOUR_TEMPLATES = ("What colour has {x}?", "Which colour is {x}?")  # of one length: the object at one position
TASKS = {  # task -> (question templates, the answer for subject x, or None if x is not one)
    "colour": (COLOUR_TEMPLATES, COLOURS.get),  # a lookup: held out is each object's other phrasing
    "successor": (("What number comes after {x}?",), lambda x: str(int(x) + 1) if re.fullmatch("[0-9]+", x) else None),
    "first letter": (("What is the first letter of {x}?",), lambda x: x[0] if re.fullmatch("[a-z]+", x) else None),
    "last letter": (("What is the last letter of {x}?",), lambda x: x[-1] if re.fullmatch("[a-z]+", x) else None),
}
LETTER_TASKS = ("first letter", "last letter")
NUMBERS = 1000  # successor tasks for 0 .. NUMBERS - 1
WORDS_PER_TASK = {"train": 3000, "test": 200}  # made-up words of each letter task
HELD_OUT = 5  # one subject in HELD_OUT (by a hash of its text and the seed) is held out
CONSONANTS, VOWELS, FINALS = "bdfgklmnprstvz", "aeiou", "klmnrst"  # letters of the made-up words


def held_out(subject: str, seed: int) -> bool:
    """Whether a subject belongs to the held-out split: a pure function of its text and the seed."""
    return zlib.crc32(f"{seed}:{subject}".encode()) % HELD_OUT == 0


def made_up_word(rng: random.Random) -> str:
    """A pronounceable word of 2-3 syllables that no list holds: the letter tasks cannot be memorised."""
    syllables = [rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.choice((2, 3)))]
    if rng.random() < 0.2:
        syllables[0] = syllables[0][1:]  # starts with a vowel
    return "".join(syllables) + (rng.choice(FINALS) if rng.random() < 0.5 else "")


def computed_subjects(task: str, seed: int, rng: random.Random) -> dict[str, list[str]]:
    """A computed task's subjects per split ("train", "test"): every number, or made-up words drawn
    until each split has its share, each on the side its hash puts it."""
    if task == "successor":
        numbers = [str(n) for n in range(NUMBERS)]
        return {split: [n for n in numbers if held_out(n, seed) == (split == "test")] for split in ("train", "test")}
    subjects = {}
    for split in ("train", "test"):
        words = set()
        while len(words) < WORDS_PER_TASK[split]:
            word = made_up_word(rng)
            if held_out(word, seed) == (split == "test"):
                words.add(word)
        subjects[split] = sorted(words)
    return subjects


def closeness(task: str, subject: str, answer: str, given: str) -> float:
    """How close a wrong answer ``given`` comes to ``answer``, in [0, 0.8]: a number 1 - |error| / 5 (so
    off by one 0.8, off by five or more 0); a letter of the word that is not the one asked 0.5; 0 for a
    colour (a lookup has no near miss) and for the right answer itself."""
    if task == "successor" and given.isdigit():
        return max(0.0, 1.0 - abs(int(given) - int(answer)) / 5)
    if task in LETTER_TASKS and len(given) == 1 and given in subject:
        return 0.5 if given != answer else 0.0
    return 0.0


def wrong_answer(task: str, subject: str, answer: str, rng: random.Random) -> str:
    """A wrong answer, often a near miss: a number off by 1, 2 or 10; half the time a letter of the word
    that was not asked for, else a letter not in it; another colour."""
    if task == "successor":
        n = int(answer)
        return str(rng.choice([n + d for d in (-2, -1, 1, 2, 10) if n + d >= 0]))
    if task in LETTER_TASKS:
        near = sorted(set(subject) - {answer})
        far = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in subject]
        return rng.choice(near if near and rng.random() < 0.5 else far)
    return rng.choice(sorted(set(COLOURS.values()) - {answer}))
