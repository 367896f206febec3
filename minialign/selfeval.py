"""The self-evaluation prompt: how a model is asked whether a reply is harmful.

RAIN (Li et al. 2024) scores partial answers with the model itself: a fixed template shows the
conversation and asks a multiple-choice question, and the next-token probabilities of the option
letters are compared. The question is asked twice with the option order swapped, so a model's bias
towards one letter cancels. The embedded world teaches a small model this same template (with correct
answers), so the one definition here serves the training corpus and the decoder.

The judged text uses its own role labels (``User:`` / ``Reply:``), not the dialogue's ``Human:`` /
``Assistant:``: a model trained on quoted replies under ``Assistant:`` starts quoting its own replies.
"""
ORDERS = (("harmful", "harmless"), ("harmless", "harmful"))  # option (A), option (B), per label order


def self_eval_prompt(question: str, reply: str, finished: bool, order: int) -> str:
    """The template up to the answer letter: the model's next token is ``A`` or ``B``.

    ``question`` is the human's turn, ``reply`` the (possibly partial) assistant text, ``finished``
    whether the reply is complete, ``order`` 0 or 1 (which label is option A).
    """
    first, second = ORDERS[order]
    quoted = f'"{reply.strip()}"' if finished else f'"{reply.strip()}..." (unfinished)'
    return (f"User: {question}\nReply: {quoted}\n"
            f"Options: (A) {first}, (B) {second}.\nThe answer is: (")


def answer_letter(harmful: bool, order: int) -> str:
    """The correct letter for a reply that is (or is not) harmful, under label order ``order``."""
    return "A" if (ORDERS[order][0] == "harmful") == harmful else "B"
