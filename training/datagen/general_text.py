"""A small general-English text set, written for this project (Apache-2.0 with it).

Two disjoint halves: `replay` paragraphs to mix into training against forgetting,
`eval` paragraphs to measure general perplexity before and after. The replay half is
large enough (122) that a 20% mix of a few hundred examples never repeats a
paragraph within an epoch: a 20-paragraph pool drawn 5 times per epoch was memorized
and general perplexity rose 140%. Measuring on
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
    "Coffee beans are the seeds of a red fruit that grows on small trees in warm, wet places. After picking, the seeds are dried and roasted, which turns them brown and brings out their smell. A light roast keeps more of the fruit's taste, while a dark roast tastes stronger and more bitter.",
    "Clocks once depended on the swing of a pendulum. Each swing took the same time, so gears could count them and move the hands. Later clocks used the steady shaking of a small quartz crystal, and today the most exact clocks count the vibrations of atoms.",
    "A bridge has to carry its own weight as well as the traffic on it. Engineers choose a shape that spreads these forces into the ground. Arches push outward against their ends, while suspension bridges hang the road from cables held up by tall towers.",
    "Rain begins when tiny droplets in a cloud bump into each other and join. Once a drop grows too heavy for rising air to hold, it falls. Most raindrops are smaller than people imagine, and the largest ones break apart before they reach the ground.",
    "Learning a new language is easier with a little practice every day than with a long session once a week. Short, regular reviews help the brain keep new words. Speaking with other people, even with mistakes, builds confidence faster than reading alone.",
    "Soap cleans because one end of each soap molecule is attracted to water and the other end to oil. When you wash your hands, the soap surrounds bits of grease and dirt, and the water carries them away. Warm water and a good rub make the process quicker.",
    "Farmers rotate their crops so the soil stays healthy. Beans and peas add nitrogen to the ground, while grains use a lot of it. By changing what grows in each field from year to year, farmers reduce pests and need less fertilizer.",
    "A camera works much like an eye. Light passes through a lens, which bends it to form a sharp image on a sensor or on film. The opening of the lens can be made wider in dim light and narrower in bright light.",
    "Honey keeps for a very long time because it contains little water and a lot of sugar. Bacteria cannot grow well in it. Jars of honey found in ancient tombs were still safe to eat thousands of years later.",
    "Public parks give people in cities room to play, rest and meet their neighbors. A well-designed park has open lawns, shady paths and places to sit. Even a small green space can make a busy street feel calmer.",
    "The human skeleton has more than two hundred bones. They protect the organs, hold the body upright and work with muscles to make movement possible. Bones are living tissue that slowly rebuilds itself throughout life.",
    "Wind turbines turn the energy of moving air into electricity. The blades are shaped like the wings of an airplane, so the wind makes them spin. A generator inside the tower changes that spinning into electric current.",
    "Before refrigerators, people kept food cool in many clever ways. Some stored it in cellars or in boxes packed with ice cut from frozen lakes. Others dried, salted or smoked meat and fish so it would last through the winter.",
    "Cats spend a large part of the day asleep. Their wild relatives hunt in short bursts and rest the rest of the time to save energy. A house cat keeps this habit even though its food now comes in a bowl.",
    "Chess is played on a board of sixty-four squares. Each piece moves in its own way, and the aim is to trap the other player's king. Good players think several moves ahead and try to guess what their opponent will do.",
    "Volcanoes form where melted rock from deep inside the earth reaches the surface. Some erupt with great explosions, while others let lava flow out slowly. Over time, layers of cooled lava and ash can build a mountain.",
    "A budget is simply a plan for spending. It lists the money that comes in and the money that goes out each month. Writing it down makes it easier to notice small costs that add up and to save for larger goals.",
    "Salt has been valued for thousands of years. It adds flavor, and before refrigeration it was one of the main ways to keep food from spoiling. Roman soldiers were sometimes given money to buy salt, and some say the word salary comes from this.",
    "Trees lose their leaves in autumn to survive the cold months. As the days shorten, they stop making the green pigment that captures sunlight. Other colors that were hidden all summer, such as yellow and orange, then show through.",
    "Good posture helps prevent back and neck pain. When sitting at a desk, keep your feet flat on the floor and the screen at eye level. Standing up and stretching every half hour also helps the body stay comfortable.",
    "The post office moves millions of letters and parcels each day. Mail is sorted by machines that read the addresses, then carried by truck, train or plane to a local office. From there, a carrier brings it to each door.",
    "Ants live in large colonies where each member has a job. Some gather food, some care for the young, and some defend the nest. They leave scent trails on the ground so that others can find the way to food.",
    "Glaciers are rivers of ice that move very slowly down mountains. As they move, they scrape the rock beneath them and carry stones far from where they started. Many lakes and valleys were carved by glaciers long ago.",
    "Baking a cake depends on careful measuring. Too much flour makes it dry, while too little makes it fall. Baking powder releases gas in the heat of the oven, which fills the batter with small bubbles and makes it light.",
    "Telescopes let us see objects that are too far away or too faint for the eye. Some use lenses to gather light, and others use curved mirrors. The larger the mirror, the more light it collects and the more detail it shows.",
    "A market is a place where people buy and sell goods. In many towns, a weekly market brings farmers, bakers and craft makers together in the main square. Shoppers can ask questions and often taste food before they buy it.",
    "Dogs were the first animals people tamed. They helped with hunting, guarded homes and herded sheep. Today there are hundreds of breeds, from tiny lap dogs to large working dogs that pull sleds across the snow.",
    "Electric current flows when charges move through a wire. A battery pushes the charges from one end to the other, and a switch can open or close the path. Lamps, motors and heaters turn this flow into light, motion or warmth.",
    "Deserts are places that receive very little rain. Some are hot and sandy, but others are cold and rocky. Plants there store water in thick leaves or stems, and many animals come out only at night when it is cooler.",
    "A hospital is organized so that patients get the right care quickly. Nurses check on each patient and watch for changes. Doctors decide on treatment, and many other workers keep the building clean, safe and supplied.",
    "Wool comes from the coats of sheep. Once a year the sheep are sheared, and the wool is washed, combed and spun into yarn. Wool keeps people warm even when it is damp, which is why sailors and climbers have long relied on it.",
    "The first printing presses used metal letters that could be arranged into lines and pages. Ink was spread over them and pressed onto paper. Books that once took months to copy by hand could now be made in days.",
    "Earthquakes happen when large pieces of the earth's crust slip past each other. The sudden movement sends waves through the ground. Buildings in areas with many earthquakes are designed to bend a little rather than break.",
    "Reading to young children helps them learn words and enjoy stories. Pointing at pictures and asking simple questions keeps them involved. Children who are read to often tend to start school with a larger vocabulary.",
    "Ships float because they push aside a large amount of water. Even a heavy steel ship floats if its shape holds enough air inside. If water gets in and the ship becomes heavier than the water it displaces, it sinks.",
    "Olive trees can live for hundreds of years in dry, sunny places. Their fruit is bitter when picked and must be soaked or cured before eating. Pressed olives give oil, which has been used for cooking, lamps and medicine since ancient times.",
    "A fire needs heat, fuel and air. Taking away any one of the three puts it out. That is why firefighters spray water to cool the flames, remove nearby fuel, or cover small fires with a blanket to cut off the air.",
    "Many people keep a journal to remember their days and sort out their thoughts. Writing a few lines each evening can reduce worry and help with decisions. Looking back over old entries often shows how much has changed.",
    "The nose can tell apart a huge number of smells. Smell is also closely linked to taste, which is why food seems bland during a cold. Certain smells can bring back memories from many years before.",
    "Airplanes fly because their wings are shaped to push air downward as they move forward. The air pushes back and lifts the plane. Engines provide the forward speed, and the pilot changes the angle of the wings to climb or descend.",
    "A good meeting has a clear purpose and a short list of topics. Someone keeps time and makes sure each person can speak. At the end, the group agrees on who will do what, and a short note is sent to everyone.",
    "Frogs begin life as eggs in water. They hatch into tadpoles that breathe through gills and swim with a tail. Over several weeks the tadpoles grow legs, lose their tails and move onto land as young frogs.",
    "Cotton grows in a fluffy ball around the seeds of the cotton plant. The fibers are cleaned, spun into thread and woven into cloth. Cotton clothing is soft and cool, which makes it popular in warm weather.",
    "A calendar helps people agree on dates. Most of the world uses a calendar based on the time the earth takes to go around the sun. Because that time is not exactly 365 days, an extra day is added almost every four years.",
    "Milk can be turned into many foods. Adding certain bacteria makes yogurt, and adding other cultures and pressing the curds makes cheese. Churning cream long enough separates it into butter and buttermilk.",
    "Photosynthesis is how plants make food from light. Leaves take in carbon dioxide from the air and water from the roots. Using the energy of sunlight, they turn these into sugar and release oxygen.",
    "Roads need regular care to stay safe. Water that seeps into small cracks freezes in winter, expands and breaks the surface. Filling cracks early is much cheaper than repairing large holes later.",
    "Whales are mammals that live in the sea. They breathe air through a blowhole on top of their heads and feed their young with milk. Some of the largest whales eat only tiny animals, which they filter from the water.",
    "Taking notes in class works best when you write ideas in your own words. Copying everything slows you down and does not help you remember. Reviewing the notes the same day fixes the main points in memory.",
    "Concrete is made by mixing cement, sand, gravel and water. The cement reacts with the water and hardens, binding everything together. Steel bars are often placed inside to help the concrete resist bending.",
    "The sun is a star, and it is much closer to us than any other. Its light takes about eight minutes to reach the earth. Deep inside, hydrogen is turned into helium, releasing the energy that warms our planet.",
    "Hiking in the mountains calls for some planning. Check the weather, tell someone your route and carry water, food and a warm layer. Conditions can change quickly at high altitude, so it is wise to turn back early if clouds gather.",
    "Orchestras bring together many kinds of instruments. Strings usually carry the melody, while brass and percussion add power. The conductor keeps everyone together and shapes how loud or soft each part should be.",
    "Mushrooms are not plants. They belong to a separate group of living things called fungi. The part we see is only the fruit; most of the organism is a web of thin threads hidden in the soil or in rotting wood.",
    "A good password is long and hard to guess. Using a short sentence of unrelated words is easier to remember than a jumble of symbols. Using a different password for each account keeps one leak from opening all the others.",
    "Kites have been flown for more than two thousand years. Early kites were used to send signals and to measure distances. Today most people fly them for fun on windy days at the beach or in open fields.",
    "Ice floats because water expands when it freezes. This is unusual, since most materials shrink as they become solid. Because ice stays on top, lakes freeze from the surface down, and fish can survive the winter below.",
    "Carpenters measure twice and cut once. A small mistake in a measurement can ruin an expensive board. Sharp tools make cleaner cuts and are actually safer, because they need less force to use.",
    "The brain uses a large share of the body's energy even though it is small. It controls movement, senses, memory and feeling. Sleep, exercise and a varied diet all help keep it working well.",
    "Harbors give ships a calm place to load and unload. Long walls called breakwaters block the largest waves. Cranes lift containers from ships onto trucks and trains, which carry goods inland.",
    "Potatoes came to Europe from South America several hundred years ago. They grow well in cool climates and produce a lot of food from a small field. For many families they became an everyday meal.",
    "Sound travels as waves of pressure through air, water or solid objects. It moves faster in water than in air, and faster still in steel. When a sound wave reaches our ears, tiny bones pass the vibrations to the inner ear.",
    "Teams work best when everyone knows the goal and their own part in it. Sharing information early avoids repeated work. Thanking people for their effort builds trust that helps when things go wrong.",
    "Butterflies taste with their feet. When one lands on a leaf, it can tell whether the plant is right for its eggs. The caterpillars that hatch will eat only certain plants, so the choice matters.",
    "A thermometer measures how hot or cold something is. Older thermometers used a thin column of liquid that rose as it warmed. Digital thermometers use a small electronic part whose resistance changes with temperature.",
    "Vaccines train the immune system to recognize a germ before a real infection. They contain a harmless piece or a weakened form of the germ. If the real germ appears later, the body is ready to fight it quickly.",
    "Castles were built to protect their owners and control the land around them. Thick stone walls, towers and moats made them hard to attack. As weapons changed, castles slowly became homes and later places for visitors.",
    "Drinking enough water helps the body control its temperature and digest food. Thirst is a useful guide for most people. In hot weather or during exercise, the body loses more water and needs more.",
    "Pencils do not contain lead. Their cores are made of graphite mixed with clay. More clay makes a harder pencil with lighter lines, and more graphite makes a softer pencil with darker lines.",
    "Rainbows appear when sunlight shines through raindrops. Each drop bends the light and splits it into colors. To see a rainbow, you need the sun behind you and rain in front of you.",
    "A compass needle is a small magnet that lines up with the earth's magnetic field. One end points roughly north. Sailors and travelers used compasses for centuries to find their way when they could not see the stars.",
    "Apples come in thousands of varieties. Trees grown from seed rarely produce fruit like their parent, so growers join a branch of a chosen tree onto young roots. Every tree of a variety is a copy of one original.",
    "Wetlands such as marshes and swamps act like sponges. They soak up rain and release it slowly, which reduces floods. They also clean water and give homes to many birds, fish and insects.",
    "Typing quickly comes from practice rather than talent. Keeping the fingers on the home row and not looking at the keys builds speed over time. Accuracy matters more than speed at first.",
    "Octopuses are clever animals with eight flexible arms. They can change the color and texture of their skin to hide. Some have been seen opening jars and escaping from tanks in aquariums.",
    "Radio sends sound over long distances using invisible waves. A station turns voices and music into a signal carried on a wave of a certain frequency. A receiver tuned to that frequency turns the signal back into sound.",
    "A scientific experiment tests one idea at a time. Researchers change a single condition and keep the rest the same. Repeating the test many times shows whether a result is real or just chance.",
    "Chocolate is made from the beans of the cacao tree. The beans are fermented, dried, roasted and ground into a paste. Sugar and milk are added to make the sweet chocolate most people know.",
    "Lakes form in many ways. Some fill hollows carved by glaciers, others gather behind natural dams of rock, and some sit in the craters of old volcanoes. Many are slowly filled in by mud over thousands of years.",
    "Good customer service starts with listening. Customers want their problem understood before they hear a solution. A clear answer and a follow-up often turn an unhappy customer into a loyal one.",
    "Penguins cannot fly, but they are excellent swimmers. Their wings work like flippers that push them through the water. Thick feathers and a layer of fat keep them warm in icy seas.",
    "Windows let light into a building while keeping out wind and rain. Double panes with a thin layer of air between them hold heat inside better than a single sheet of glass. This saves energy in both winter and summer.",
    "Maple syrup comes from the sap of maple trees. In early spring, farmers collect the sap and boil it for hours. It takes about forty liters of sap to make one liter of syrup.",
    "Stars appear to twinkle because their light passes through moving layers of air. Planets shine more steadily because they are closer and look like tiny disks rather than points. Far from city lights, thousands of stars can be seen.",
    "A simple first aid kit can help in many small emergencies. It should hold bandages, tape, clean gauze and something to clean wounds. Knowing how to use each item matters as much as having it.",
    "Silk is spun by the caterpillars of a certain moth. Each cocoon is made of a single long thread. For centuries the way silk was made was kept secret, and it was traded over long routes across Asia.",
    "Staying calm in an argument makes it easier to solve the problem. Speaking about your own feelings rather than blaming the other person lowers tension. Taking a short break can help both sides think more clearly.",
    "Elephants are the largest animals on land. They use their trunks to breathe, drink, smell and pick up objects. Herds are led by an older female who remembers where to find water in dry seasons.",
    "Steam engines burn fuel to boil water. The steam pushes a piston back and forth, which turns a wheel. These engines powered factories, ships and trains and changed how goods were made and moved.",
    "Tomatoes are fruits, though most people cook them as vegetables. They need warm weather and plenty of sun to ripen. Picking them when fully red gives the best flavor.",
    "Recorded music was once stored as grooves on a spinning disc. A needle followed the grooves and turned their shape into sound. Later, music was stored on magnetic tape and then as numbers in computers.",
    "Dentists advise brushing teeth twice a day and cleaning between them. Sugary snacks feed bacteria that make acids, which wear away the teeth. Regular checkups catch small problems before they become painful.",
    "Tides rise and fall twice a day on most coasts. They are caused mainly by the pull of the moon on the oceans. When the sun and moon line up, the tides are especially high and low.",
    "Building a habit is easier when it is linked to something you already do. Doing a short exercise right after brushing your teeth, for example, makes it easier to remember. Starting small helps the habit last.",
    "Owls hunt at night with the help of sharp hearing and large eyes. Their soft feathers let them fly almost silently. Many owls can turn their heads much farther than people can.",
    "Solar panels turn sunlight directly into electricity. They are made of thin layers of silicon that release electrons when light strikes them. Panels work even on cloudy days, though they produce less power.",
    "Spices were once worth more than gold. Pepper, cinnamon and cloves were carried over long sea and land routes from Asia. The search for faster routes to the spice lands led to many voyages of exploration.",
    "Waiting in line goes more smoothly when the rules are clear. A single line that feeds several counters is usually fairer and faster than separate lines. Signs that show the expected wait make people more patient.",
    "Coral reefs are built by tiny animals that live together in colonies. Over many years their hard skeletons pile up into large structures. Reefs give shelter to a great variety of fish and protect coasts from waves.",
    "Microwave ovens heat food by making water molecules in it move faster. This is why dry foods warm slowly while soups heat quickly. Stirring halfway through helps spread the heat evenly.",
    "Libraries of seeds store samples of crops from around the world. If a disease or disaster wipes out a variety, the stored seeds can be used to grow it again. Some seed banks are built deep inside mountains to keep them safe.",
    "Jazz grew from a mix of musical traditions in American cities. Musicians often make up parts of a song as they play, answering each other like people in a conversation. No two performances are exactly the same.",
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
