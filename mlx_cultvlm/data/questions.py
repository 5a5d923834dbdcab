"""The questions: those training lines ask (`data build`) and the held-out ones evaluation asks
(`cultvlm eval`). No evaluation phrasing is ever a training phrasing (tested), so the figures
measure what the model learned about the pictures, not the wording of the questions; each kind
has at least two phrasings per language, and a picture gets one of them by its hash.
"""

from __future__ import annotations

# -- training (data build) ------------------------------------------------------------------
NAMING_QUESTIONS = {
    "ru": ["Кто это?", "Кто изображён на картинке?", "Кто на этой картинке?", "Как зовут этого персонажа?",
           "Что это за персонаж?"],
    "en": ["Who is this?", "Who is shown in the picture?", "Who is in this image?", "What is this character's name?",
           "Which character is this?"],
}
FACT_QUESTIONS = {  # a fact line answers with where the entity comes from: so two ask for it
    "ru": ["Что ты знаешь об этом персонаже?", "Расскажи что-нибудь об этом персонаже.",
           "Назови интересный факт о том, кто на картинке.", "Кто придумал этого персонажа?",
           "Из какого произведения этот персонаж?"],
    "en": ["What do you know about this character?", "Tell me something about this character.",
           "Give an interesting fact about the character in the picture.", "Who created this character?",
           "Which work is this character from?"],
}
DESCRIBE_QUESTIONS = {
    "ru": ["Опиши картинку.", "Что изображено на картинке?", "Опиши, что ты видишь."],
    "en": ["Describe the picture.", "What does this image show?", "Describe what you see."],
}
VERIFY_QUESTION = {"ru": "Это {name}?", "en": "Is this {name}?"}

# -- held out: evaluation only ----------------------------------------------------------------
EVAL_QUESTIONS = {
    "naming": {
        "ru": ["Назови персонажа на этом изображении.", "Кто нарисован здесь? Назови имя персонажа."],
        "en": ["Name the character in this image.", "Who is drawn here? Give the character's name."],
    },
    "fact": {
        "ru": ["Кто это, из какого он произведения и кто его придумал?",
               "Назови этого персонажа, произведение, из которого он, и его автора."],
        "en": ["Who is this, which work is it from, and who created it?",
               "Name this character, the work it comes from and its author."],
    },
    "verify": {
        "ru": ["Это {name}? Ответь «да» или «нет».", "На картинке {name}? Ответь «да» или «нет»."],
        "en": ["Is this {name}? Answer yes or no.", "Does this picture show {name}? Answer yes or no."],
    },
    "describe": {
        "ru": ["Опиши, что нарисовано на этом изображении.", "Что ты видишь на этом рисунке? Опиши."],
        "en": ["Describe this image.", "What can you see in this image? Describe it."],
    },
}


def training_phrasings() -> set[str]:
    """Every question a training line can ask (verification with its {name} slot)."""
    return {q for table in (NAMING_QUESTIONS, FACT_QUESTIONS, DESCRIBE_QUESTIONS)
            for questions in table.values() for q in questions} | set(VERIFY_QUESTION.values())
