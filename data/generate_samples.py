"""Generate the small bilingual sample corpora shipped in data/sample/ (deterministic, seed 0).

A toy "world" of facts (arithmetic, animals, colours, short stories) written as prose for pretraining,
as question/answer conversations for SFT, as correct-vs-wrong answer pairs for reward modelling and
DPO, and as bare questions for PPO. Small enough for a CPU to learn something visible in minutes.

    python data/generate_samples.py   # rewrites data/sample/*.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "sample"
EN_NUM = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen \
seventeen eighteen nineteen twenty".split()
ZH_NUM = "零 一 二 三 四 五 六 七 八 九 十 十一 十二 十三 十四 十五 十六 十七 十八 十九 二十".split()
ANIMALS = [  # english, chinese, sound, sound_zh, legs, home, home_zh
    ("cow", "牛", "moo", "哞哞", 4, "on a farm", "农场"),
    ("dog", "狗", "woof", "汪汪", 4, "in a house", "家里"),
    ("cat", "猫", "meow", "喵喵", 4, "in a house", "家里"),
    ("duck", "鸭子", "quack", "嘎嘎", 2, "near a pond", "池塘边"),
    ("sheep", "羊", "baa", "咩咩", 4, "on a farm", "农场"),
    ("owl", "猫头鹰", "hoot", "咕咕", 2, "in a forest", "森林"),
    ("frog", "青蛙", "croak", "呱呱", 4, "near a pond", "池塘边"),
    ("hen", "母鸡", "cluck", "咯咯", 2, "on a farm", "农场"),
]
COLOURS = [  # thing, colour, thing_zh, colour_zh
    ("the sky", "blue", "天空", "蓝色"),
    ("grass", "green", "草", "绿色"),
    ("snow", "white", "雪", "白色"),
    ("a banana", "yellow", "香蕉", "黄色"),
    ("coal", "black", "煤", "黑色"),
    ("a tomato", "red", "西红柿", "红色"),
    ("an orange", "orange", "橙子", "橙色"),
]
NAMES = ["Tom", "Anna", "Lily", "Sam", "Ben", "Mia", "Leo", "Zoe"]
NAMES_ZH = ["小明", "小红", "小华", "小丽", "小刚", "小芳"]
FRUITS = [("apple", "苹果"), ("pear", "梨"), ("plum", "李子"), ("peach", "桃子")]
SYSTEM = ["You are a helpful assistant.", "You are a friendly teacher. Answer briefly.", "你是一个乐于助人的助手。"]


def en_sum(a: int, b: int) -> str:
    return f"{a} plus {b} equals {a + b}."


def zh_sum(a: int, b: int) -> str:
    return f"{a}加{b}等于{a + b}。"


def qa_pairs(rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, correct answer, wrong answer) in both languages."""
    out = []
    other = random.Random(1)  # a separate stream, so the other sample files stay as they were
    for a in range(11):
        for b in range(11):
            wrong = a + b + rng.choice([-2, -1, 1, 2, 3])
            bad_en, bad_zh = f"{a} plus {b} equals {max(wrong, 0)}.", f"{a}加{b}等于{max(wrong, 0)}。"
            if other.random() < 0.5:  # a true sum of the wrong numbers: a reward model must read the question
                a2, b2 = other.choice([(b2, a2) for a2, b2 in [(a + 1, b), (a, b + 1), (max(a - 1, 0), b + 2)]])
                bad_en, bad_zh = en_sum(a2, b2), zh_sum(a2, b2)
            out.append((f"What is {a} plus {b}?", en_sum(a, b), bad_en))
            out.append((f"{a}加{b}等于几？", zh_sum(a, b), bad_zh))
    for en, zh, sound, sound_zh, legs, home, _home_zh in ANIMALS:
        other = rng.choice([x for x in ANIMALS if x[2] != sound])
        out.append((f"What sound does a {en} make?", f"A {en} says {sound}.", f"A {en} says {other[2]}."))
        out.append((f"{zh}怎么叫？", f"{zh}的叫声是{sound_zh}。", f"{zh}的叫声是{other[3]}。"))
        out.append(
            (
                f"How many legs does a {en} have?",
                f"A {en} has {EN_NUM[legs]} legs.",
                f"A {en} has {EN_NUM[6 - legs]} legs.",
            )
        )
        out.append((f"{zh}有几条腿？", f"{zh}有{ZH_NUM[legs]}条腿。", f"{zh}有{ZH_NUM[6 - legs]}条腿。"))
        out.append((f"Where does a {en} live?", f"A {en} lives {home}.", f"A {en} lives on the moon."))
    for thing, colour, thing_zh, colour_zh in COLOURS:
        other = rng.choice([c for c in COLOURS if c[1] != colour])
        out.append(
            (
                f"What colour is {thing}?",
                f"{thing[0].upper() + thing[1:]} is {colour}.",
                f"{thing[0].upper() + thing[1:]} is {other[1]}.",
            )
        )
        out.append((f"{thing_zh}是什么颜色的？", f"{thing_zh}是{colour_zh}的。", f"{thing_zh}是{other[3]}的。"))
    return out


def pretrain_docs(rng: random.Random, n: int) -> list[str]:
    docs = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            pairs = [(rng.randint(0, 10), rng.randint(0, 10)) for _ in range(rng.randint(3, 6))]
            if rng.random() < 0.5:
                docs.append("Let us practise adding. " + " ".join(en_sum(a, b) for a, b in pairs))
            else:
                docs.append("我们来练习加法。" + "".join(zh_sum(a, b) for a, b in pairs))
        elif kind < 0.55:
            picks = rng.sample(ANIMALS, 3)
            if rng.random() < 0.5:
                docs.append(
                    " ".join(
                        f"A {en} says {s}. A {en} has {EN_NUM[legs]} legs and lives {home}."
                        for en, _, s, _, legs, home, _ in picks
                    )
                )
            else:
                docs.append(
                    "".join(
                        f"{zh}的叫声是{s}。{zh}有{ZH_NUM[legs]}条腿，住在{h}。" for _, zh, _, s, legs, _, h in picks
                    )
                )
        elif kind < 0.75:
            picks = rng.sample(COLOURS, 3)
            if rng.random() < 0.5:
                docs.append(
                    "Colours are everywhere. " + " ".join(f"{t[0].upper() + t[1:]} is {c}." for t, c, _, _ in picks)
                )
            else:
                docs.append("颜色无处不在。" + "".join(f"{t}是{c}的。" for _, _, t, c in picks))
        else:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            if rng.random() < 0.5:
                name, (fruit, _) = rng.choice(NAMES), rng.choice(FRUITS)
                docs.append(
                    f"{name} had {EN_NUM[a]} {fruit}s. A friend gave {name} {EN_NUM[b]} more. "
                    f"Now {name} has {EN_NUM[a + b]} {fruit}s. {a} plus {b} equals {a + b}."
                )
            else:
                name, (_, fruit) = rng.choice(NAMES_ZH), rng.choice(FRUITS)
                docs.append(
                    f"{name}有{ZH_NUM[a]}个{fruit}，朋友又给了{name}{ZH_NUM[b]}个。"
                    f"现在{name}有{ZH_NUM[a + b]}个{fruit}。{a}加{b}等于{a + b}。"
                )
    return docs


def conversation(rng: random.Random, items: list[tuple[str, str, str]]) -> list[dict]:
    msgs = [{"role": "system", "content": rng.choice(SYSTEM)}] if rng.random() < 0.3 else []
    for q, a, _ in items:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(exist_ok=True)
    qa = qa_pairs(rng)

    def write(name: str, rows: list[dict]) -> None:
        with open(OUT / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{OUT / name}: {len(rows)} records")

    write("pretrain.jsonl", [{"text": t} for t in pretrain_docs(rng, 4000)])
    sft = []
    for _ in range(1200):
        k = 1 if rng.random() < 0.75 else 2
        sft.append({"conversations": conversation(rng, rng.sample(qa, k))})
    write("sft.jsonl", sft)
    pref = []
    for q, good, bad in rng.sample(qa, min(len(qa), 400)):
        prompt = [{"role": "user", "content": q}]
        pref.append(
            {
                "chosen": prompt + [{"role": "assistant", "content": good}],
                "rejected": prompt + [{"role": "assistant", "content": bad}],
            }
        )
    write("preference.jsonl", pref)
    write("prompts.jsonl", [{"prompt": q} for q, _, _ in rng.sample(qa, 200)])


if __name__ == "__main__":
    main()
