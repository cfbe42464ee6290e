"""A small general-English text set, written for this project (Apache-2.0 with it).

Two disjoint halves: `replay` paragraphs to mix into training against forgetting,
`eval` paragraphs to measure general perplexity before and after. Measuring on
text the adapter trained on would hide the forgetting, so they never overlap.

    python -m training.datagen.general_text --out data/general
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.datagen.function_calling import write_jsonl

REPLAY = [
    "Bread rises because yeast eats the sugars in flour and releases carbon dioxide. The gas is trapped by a network of gluten, which forms when the dough is kneaded. A warm kitchen speeds the process, while a cold one slows it down and often gives the bread a deeper flavor.",
    "A library is more than a room full of books. It lends films and music, offers quiet places to study, and runs reading groups for children. Many libraries also help people fill in forms, learn to use a computer, or find information about jobs in their town.",
    "The moon has no light of its own. It reflects the light of the sun, and the part we see changes as it moves around the earth. When it sits between the earth and the sun, its lit side faces away from us and we call it a new moon.",
    "Learning a musical instrument takes patience. Beginners often practice short pieces slowly, paying attention to rhythm before speed. Over weeks, the fingers remember the movements, and playing becomes less about effort and more about listening.",
    "Rivers shape the land they flow through. Over thousands of years, water carries sand and stones downstream, cutting valleys and building wide plains near the sea. Floods, though dangerous, spread rich soil that farmers have relied on for centuries.",
    "A good night's sleep helps the body repair itself and the mind sort through the day. Most adults need seven to nine hours. Keeping a regular bedtime, avoiding bright screens late at night, and sleeping in a dark, cool room all make rest easier.",
    "Bicycles are among the most efficient machines people have built. A rider turns food into motion with very little energy lost, and a bicycle needs no fuel, little space, and simple repairs. In many cities, cycling is the fastest way to cross town at rush hour.",
    "Bees visit flowers to collect nectar and pollen. As they move from plant to plant, they carry pollen with them, which allows many fruits and vegetables to grow. Without pollinators, apples, almonds, and many other crops would be far harder to produce.",
    "Writing a clear letter starts with knowing what you want the reader to do. Put the main point near the beginning, keep sentences short, and end with the next step. A letter that is easy to read is more likely to get a quick answer.",
    "Mountains change the weather around them. As moist air rises over a range, it cools and drops its water as rain or snow. The far side often stays dry, which is why deserts can lie only a short distance from green, rainy slopes.",
    "Cooking rice well is mostly a matter of water and time. Rinsing the grains removes extra starch, and the right amount of water depends on the kind of rice. Letting the pot rest, covered, for a few minutes after cooking gives the grains an even texture.",
    "A map is a simplified picture of a place. It leaves out most details so that the important ones, like roads, rivers, and towns, are easy to see. The scale tells how distances on the paper relate to distances on the ground.",
    "Volunteers keep many community events running. They set up chairs, serve food, guide visitors, and clean up afterwards. For many people, volunteering is also a way to meet neighbors and learn new skills outside of work.",
    "The heart is a muscle that pumps blood through the body without rest. Each beat pushes blood rich in oxygen out to the organs, and veins bring it back. Regular exercise makes the heart stronger, so it can do the same work with fewer beats.",
    "Trains changed the way people thought about distance. Journeys that once took days by horse could be made in hours, and towns along the railway grew quickly. Clocks across whole countries were set to the same time so that timetables made sense.",
    "Gardening teaches people to plan for seasons. Seeds planted in spring need steady water and sunlight, while autumn is the time to prepare the soil for the next year. Even a small balcony can grow herbs, tomatoes, and flowers.",
    "Saving money is easier with a simple plan. Many people set aside a fixed share of their income as soon as they are paid, before spending on anything else. Small amounts saved regularly grow into a useful cushion for unexpected costs.",
    "Glass is made by heating sand with other minerals until it melts, then cooling it quickly so that it does not form crystals. The result is hard and clear. Glassmakers can blow, press, or roll the hot material into bottles, windows, and lenses.",
    "A good teacher notices when a student is confused and tries another way to explain the idea. Examples, drawings, and questions often help more than repeating the same words. Students learn best when they feel safe to make mistakes.",
    "Lighthouses were built to warn ships away from rocks and to guide them into harbors. Each one flashes its light in its own pattern, so sailors can tell which lighthouse they are looking at. Today many are automatic, but some still have keepers.",
]

EVAL = [
    "Tea was first drunk in China, where people boiled leaves in water as a medicine. Over centuries it became an everyday drink and spread along trade routes to the rest of Asia and later to Europe. Today it is the most popular drink in the world after water.",
    "Recycling works best when materials are sorted correctly. Paper, glass, metal, and plastic are processed in different ways, and a single dirty item can spoil a whole batch. Rinsing containers and following local rules makes recycling far more effective.",
    "Snow forms when water vapor in clouds freezes into tiny ice crystals. As the crystals fall, they join together into flakes. Because each flake meets slightly different air on the way down, no two flakes grow in exactly the same shape.",
    "Walking every day is one of the simplest ways to stay healthy. It strengthens the legs and heart, lifts the mood, and needs no special equipment. A short walk after a meal can also help the body handle sugar more easily.",
    "Museums keep objects that tell the story of people and nature. Curators decide what to collect, how to protect it, and how to explain it to visitors. A well planned exhibition lets people see connections between objects from very different times and places.",
    "The ocean covers most of the planet and holds most of its water. It stores heat from the sun and moves it around the world in great currents, which shape the climate on land. The ocean is also home to a vast range of living things.",
    "Friendship grows through small acts repeated over time. Listening carefully, keeping promises, and showing up when someone needs help build trust. Good friends do not need to agree on everything, but they respect each other's views.",
    "Paper was invented in China about two thousand years ago. Early paper was made from plant fibers soaked in water, pressed into thin sheets, and dried in the sun. It was cheaper than silk and easier to carry than wood or stone.",
    "A kitchen garden can supply fresh food for much of the year. Lettuce and radishes grow quickly, beans climb on simple frames, and herbs need little space. Picking vegetables just before a meal gives them the best taste.",
    "Birds migrate to follow food and warm weather. Some fly thousands of kilometers each year, finding their way by the sun, the stars, and the earth's magnetic field. Many return to the same nesting places year after year.",
    "Clear instructions save time for everyone. Each step should describe one action, in the order it happens, with any warnings placed before the step they apply to. Testing the instructions on someone new often reveals missing details.",
    "Cities plant trees along their streets for many reasons. Trees give shade in summer, clean the air, soak up rain, and make neighborhoods more pleasant to walk through. Choosing kinds that suit the local climate helps them live for decades.",
]


def write_general(out: Path) -> dict[str, Path]:
    paths = {"replay": out / "replay.jsonl", "eval": out / "eval.jsonl"}
    write_jsonl(paths["replay"], [{"text": p} for p in REPLAY])
    write_jsonl(paths["eval"], [{"text": p} for p in EVAL])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.datagen.general_text", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dir for replay.jsonl and eval.jsonl")
    args = parser.parse_args(argv)
    for name, path in write_general(args.out).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
