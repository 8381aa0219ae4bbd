"""The pool of irrelevant or false sentences of the paper's "unrelated paragraph" copy.

The official augmentation (``modules/prompt/text_interfere.py`` of the paper's code) draws 10
sentences, with replacement, from a pool of 80 in seven groups (science, history, daily life, random
facts, philosophy, mathematics, and deliberately false statements) and puts the paragraph in front
of an image-heavy question. This pool was written for modkern in the same groups: 12 sentences each
of the first six, 16 false ones (88 in all). None of them says anything about an image.
"""

SCIENCE = (
    "Water expands when it freezes into ice.",
    "Sound travels faster through steel than through air.",
    "The human heart has four chambers.",
    "Plants take in carbon dioxide and release oxygen.",
    "Diamonds are made of carbon atoms.",
    "The moon has no atmosphere to speak of.",
    "Copper is a good conductor of electricity.",
    "A magnet attracts iron but not aluminium.",
    "Bats find insects in the dark by echolocation.",
    "Helium is lighter than the air around it.",
    "Most of the mass of an atom sits in its nucleus.",
    "Glaciers move slowly downhill under their own weight.",
)
HISTORY = (
    "The printing press spread across Europe in the fifteenth century.",
    "Ancient Egyptians wrote on sheets made from papyrus.",
    "The first modern Olympic Games took place in 1896.",
    "Roman roads were often paved with flat stones.",
    "The Great Wall was built and rebuilt over many centuries.",
    "Early sailors navigated by the positions of the stars.",
    "The steam engine changed how factories were powered.",
    "Silk was traded along routes that crossed Asia.",
    "Many medieval towns were surrounded by stone walls.",
    "The telegraph carried messages along wires before the telephone.",
    "Clay tablets kept records in ancient Mesopotamia.",
    "The first vaccines were developed against smallpox.",
)
DAILY_LIFE = (
    "Most people drink more water on hot days.",
    "A kettle switches itself off when the water boils.",
    "Bread goes stale faster in the refrigerator.",
    "Many cities collect recycling once a week.",
    "An umbrella is handy on a rainy afternoon.",
    "Some people like to read before going to sleep.",
    "Fresh herbs keep longer in a glass of water.",
    "A short walk after lunch helps many people focus.",
    "Trains are often busiest in the early morning.",
    "Socks tend to disappear in the laundry.",
    "A good pair of shoes makes a long walk easier.",
    "Markets are usually crowded on weekend mornings.",
)
RANDOM_FACTS = (
    "Octopuses have three hearts.",
    "Honey can be kept for a very long time without spoiling.",
    "A group of crows is sometimes called a murder.",
    "Bananas are botanically classified as berries.",
    "Sea otters sometimes hold hands while they sleep.",
    "The shortest war on record lasted under an hour.",
    "Some turtles can breathe through their backsides.",
    "A snail can sleep for several days at a time.",
    "Wombats produce droppings shaped like cubes.",
    "The Eiffel Tower grows slightly taller in summer.",
    "Koalas sleep for most of the day.",
    "Hummingbirds can fly backwards.",
)
PHILOSOPHY = (
    "A journey of a thousand miles begins with a single step.",
    "Knowing what you do not know is a kind of wisdom.",
    "Change is the only constant in life.",
    "Every answer raises a new question.",
    "Patience is a form of quiet strength.",
    "We rarely notice time until it has passed.",
    "A clear question is half of its answer.",
    "Habits shape a life more than single decisions.",
    "Doubt is the beginning of careful thought.",
    "Small kindnesses are remembered longer than grand gestures.",
    "What we attend to becomes our world.",
    "Simplicity is often harder than complexity.",
)
MATHEMATICS = (
    "The sum of the angles of a triangle is 180 degrees.",
    "Every even number greater than two is the sum of two primes, as far as anyone has checked.",
    "Zero is neither positive nor negative.",
    "The square root of two is an irrational number.",
    "A circle has the largest area for a given perimeter.",
    "Any number multiplied by one stays the same.",
    "There are infinitely many prime numbers.",
    "The digits of pi never settle into a repeating pattern.",
    "A cube has twelve edges and eight corners.",
    "Two parallel lines in a plane never meet.",
    "The factorial of zero is defined to be one.",
    "A dozen is twelve and a gross is twelve dozen.",
)
FALSE_STATEMENTS = (
    "The sun rises in the west every morning.",
    "Fish breathe air through their fins.",
    "Every prime number ends in the digit seven.",
    "Snow is warm when it first falls.",
    "The Pacific is the smallest ocean on Earth.",
    "Spiders have exactly six legs.",
    "Mount Everest stands in the middle of the Sahara.",
    "Gold is a gas at room temperature.",
    "The moon is larger than the Earth.",
    "Penguins live mostly in the Arctic desert.",
    "A week has nine days.",
    "Lightning never strikes the same place twice.",
    "Glass is made mostly of salt.",
    "Humans can see ultraviolet light without help.",
    "Trees grow faster at night because of the moonlight.",
    "Ten is an odd number.",
)

IRRELEVANT_SENTENCES = SCIENCE + HISTORY + DAILY_LIFE + RANDOM_FACTS + PHILOSOPHY + MATHEMATICS + FALSE_STATEMENTS
