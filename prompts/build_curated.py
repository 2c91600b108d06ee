"""Build the bundled curated two-hop prompt set, ``prompts/data/curated.jsonl``.

The fact tables below (landmark -> country, country -> capital / main language / currency / continent,
book -> author, painting -> painter, work -> composer, company -> headquarters country, person -> country of
birth, dish -> country of origin, ...) are composed into two-hop items, one template per relation composition
("The capital of the country where the Eiffel Tower is located is" -> bridge France -> answer Paris).

Each item gets a counterfactual partner: another item of the same composition with a different bridge and a
different answer, whose ``two_hop`` has the same number of tokens under both embedded tokenizers (SmolLM2 and
Gemma 3) and whose answer starts with a different first token under both. Items that cannot be paired are
dropped. Output is deterministic: compositions in table order, items in table order within each.

The file is long because it is mostly data: the fact tables (about 800 lines) come first, the builder (about 150
lines) after them; they stay in one file so that a fact and the composition that uses it are read together.

Rerun (offline, from the repository root; needs the ``models`` extra, i.e. both embedded model packages)::

    python -m prompts.build_curated            # writes prompts/data/curated.jsonl
    python -m prompts.build_curated -o out.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

OUT = Path(__file__).resolve().parent / "data" / "curated.jsonl"

# --------------------------------------------------------------------------------------------------------------
# Facts. None marks a fact left out on purpose (several official languages, contested or moving capital, a capital
# that repeats the country's name, a transcontinental country, a recently changed currency).
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Country:
    capital: str | None
    language: str | None  # main language spoken
    currency: str | None  # unit name as it follows "the currency of X is the"
    continent: str | None
    the: bool = False  # written with "the" ("the United States")


COUNTRIES: dict[str, Country] = {
    "France": Country("Paris", "French", "euro", "Europe"),
    "Italy": Country("Rome", "Italian", "euro", "Europe"),
    "Germany": Country("Berlin", "German", "euro", "Europe"),
    "Spain": Country("Madrid", "Spanish", "euro", "Europe"),
    "Portugal": Country("Lisbon", "Portuguese", "euro", "Europe"),
    "England": Country("London", "English", "pound", "Europe"),
    "Scotland": Country("Edinburgh", "English", "pound", "Europe"),
    "Wales": Country("Cardiff", None, "pound", "Europe"),
    "Ireland": Country("Dublin", "English", "euro", "Europe"),
    "Netherlands": Country("Amsterdam", "Dutch", "euro", "Europe", the=True),
    "Belgium": Country("Brussels", None, "euro", "Europe"),
    "Switzerland": Country("Bern", None, "franc", "Europe"),
    "Austria": Country("Vienna", "German", "euro", "Europe"),
    "Greece": Country("Athens", "Greek", "euro", "Europe"),
    "Finland": Country("Helsinki", "Finnish", "euro", "Europe"),
    "Russia": Country("Moscow", "Russian", "ruble", None),
    "Poland": Country("Warsaw", "Polish", "zloty", "Europe"),
    "Hungary": Country("Budapest", "Hungarian", "forint", "Europe"),
    "Romania": Country("Bucharest", "Romanian", "leu", "Europe"),
    "Denmark": Country("Copenhagen", "Danish", "krone", "Europe"),
    "Norway": Country("Oslo", "Norwegian", "krone", "Europe"),
    "Sweden": Country("Stockholm", "Swedish", "krona", "Europe"),
    "Iceland": Country("Reykjavik", "Icelandic", None, "Europe"),
    "Turkey": Country("Ankara", "Turkish", "lira", None),
    "United States": Country("Washington, D.C.", "English", "dollar", "North America", the=True),
    "Canada": Country("Ottawa", None, "dollar", "North America"),
    "Mexico": Country(None, "Spanish", "peso", "North America"),
    "Cuba": Country("Havana", "Spanish", None, "North America"),
    "Jamaica": Country("Kingston", "English", "dollar", "North America"),
    "Barbados": Country("Bridgetown", "English", "dollar", "North America"),
    "Brazil": Country("Brasília", "Portuguese", "real", "South America"),
    "Argentina": Country("Buenos Aires", "Spanish", "peso", "South America"),
    "Peru": Country("Lima", "Spanish", "sol", "South America"),
    "Chile": Country("Santiago", "Spanish", "peso", "South America"),
    "Colombia": Country("Bogotá", "Spanish", "peso", "South America"),
    "Uruguay": Country("Montevideo", "Spanish", "peso", "South America"),
    "Ecuador": Country("Quito", "Spanish", "dollar", "South America"),
    "Japan": Country("Tokyo", "Japanese", "yen", "Asia"),
    "China": Country("Beijing", "Chinese", "yuan", "Asia"),
    "South Korea": Country("Seoul", "Korean", "won", "Asia"),
    "India": Country("New Delhi", None, "rupee", "Asia"),
    "Thailand": Country("Bangkok", "Thai", "baht", "Asia"),
    "Vietnam": Country("Hanoi", "Vietnamese", "dong", "Asia"),
    "Cambodia": Country("Phnom Penh", "Khmer", "riel", "Asia"),
    "Malaysia": Country("Kuala Lumpur", "Malay", "ringgit", "Asia"),
    "Indonesia": Country(None, "Indonesian", "rupiah", "Asia"),
    "Philippines": Country("Manila", None, "peso", "Asia", the=True),
    "Iran": Country("Tehran", "Persian", "rial", "Asia"),
    "Jordan": Country("Amman", "Arabic", "dinar", "Asia"),
    "United Arab Emirates": Country("Abu Dhabi", "Arabic", "dirham", "Asia", the=True),
    "Saudi Arabia": Country("Riyadh", "Arabic", "riyal", "Asia"),
    "Egypt": Country("Cairo", "Arabic", "pound", "Africa"),
    "Kenya": Country("Nairobi", None, "shilling", "Africa"),
    "Tanzania": Country(None, None, "shilling", "Africa"),
    "Ethiopia": Country("Addis Ababa", None, "birr", "Africa"),
    "Senegal": Country("Dakar", None, None, "Africa"),
    "Nigeria": Country("Abuja", None, "naira", "Africa"),
    "South Africa": Country(None, None, "rand", "Africa"),
    "Australia": Country("Canberra", "English", "dollar", None),
    "New Zealand": Country("Wellington", "English", "dollar", None),
}

LANDMARKS: dict[str, str] = {
    "the Eiffel Tower": "France",
    "the Louvre": "France",
    "the Arc de Triomphe": "France",
    "Mont Saint-Michel": "France",
    "the Palace of Versailles": "France",
    "Notre-Dame Cathedral": "France",
    "the Colosseum": "Italy",
    "the Leaning Tower of Pisa": "Italy",
    "the Trevi Fountain": "Italy",
    "Pompeii": "Italy",
    "the Rialto Bridge": "Italy",
    "Mount Vesuvius": "Italy",
    "the Brandenburg Gate": "Germany",
    "Neuschwanstein Castle": "Germany",
    "Cologne Cathedral": "Germany",
    "the Reichstag building": "Germany",
    "the Sagrada Familia": "Spain",
    "the Alhambra": "Spain",
    "Park Güell": "Spain",
    "the Prado Museum": "Spain",
    "Belém Tower": "Portugal",
    "Big Ben": "England",
    "Stonehenge": "England",
    "Tower Bridge": "England",
    "Buckingham Palace": "England",
    "Westminster Abbey": "England",
    "Loch Ness": "Scotland",
    "Ben Nevis": "Scotland",
    "the Cliffs of Moher": "Ireland",
    "the Anne Frank House": "Netherlands",
    "the Rijksmuseum": "Netherlands",
    "the Atomium": "Belgium",
    "Manneken Pis": "Belgium",
    "the Jungfrau": "Switzerland",
    "Schönbrunn Palace": "Austria",
    "the Acropolis": "Greece",
    "the Parthenon": "Greece",
    "Meteora": "Greece",
    "the Kremlin": "Russia",
    "Red Square": "Russia",
    "Saint Basil's Cathedral": "Russia",
    "the Hermitage Museum": "Russia",
    "Lake Baikal": "Russia",
    "Wawel Castle": "Poland",
    "Bran Castle": "Romania",
    "the Little Mermaid statue": "Denmark",
    "Tivoli Gardens": "Denmark",
    "the Vasa Museum": "Sweden",
    "the Hagia Sophia": "Turkey",
    "the Blue Mosque": "Turkey",
    "Cappadocia": "Turkey",
    "the Statue of Liberty": "United States",
    "the Golden Gate Bridge": "United States",
    "Mount Rushmore": "United States",
    "the Grand Canyon": "United States",
    "the Empire State Building": "United States",
    "Yellowstone National Park": "United States",
    "the Hollywood Sign": "United States",
    "the CN Tower": "Canada",
    "Banff National Park": "Canada",
    "Chichen Itza": "Mexico",
    "Teotihuacan": "Mexico",
    "Christ the Redeemer": "Brazil",
    "Sugarloaf Mountain": "Brazil",
    "Machu Picchu": "Peru",
    "the Atacama Desert": "Chile",
    "the Galápagos Islands": "Ecuador",
    "the Great Wall": "China",
    "the Forbidden City": "China",
    "the Terracotta Army": "China",
    "Mount Fuji": "Japan",
    "Himeji Castle": "Japan",
    "the Fushimi Inari Shrine": "Japan",
    "Gyeongbokgung Palace": "South Korea",
    "the Taj Mahal": "India",
    "the Golden Temple": "India",
    "Angkor Wat": "Cambodia",
    "Wat Arun": "Thailand",
    "Ha Long Bay": "Vietnam",
    "the Petronas Towers": "Malaysia",
    "Borobudur": "Indonesia",
    "Persepolis": "Iran",
    "Petra": "Jordan",
    "the Burj Khalifa": "United Arab Emirates",
    "the Pyramids of Giza": "Egypt",
    "the Great Sphinx": "Egypt",
    "Abu Simbel": "Egypt",
    "the Valley of the Kings": "Egypt",
    "Mount Kilimanjaro": "Tanzania",
    "Table Mountain": "South Africa",
    "the Sydney Opera House": "Australia",
    "Uluru": "Australia",
    "the Great Barrier Reef": "Australia",
    "Milford Sound": "New Zealand",
}

# author -> (country, native language); None where the native language is not a single clear one.
AUTHORS: dict[str, tuple[str, str | None]] = {
    "Jane Austen": ("England", "English"),
    "William Shakespeare": ("England", "English"),
    "Charles Dickens": ("England", "English"),
    "Mary Shelley": ("England", "English"),
    "Charlotte Brontë": ("England", "English"),
    "Emily Brontë": ("England", "English"),
    "Lewis Carroll": ("England", "English"),
    "Daniel Defoe": ("England", "English"),
    "Geoffrey Chaucer": ("England", "English"),
    "J. K. Rowling": ("England", "English"),
    "Agatha Christie": ("England", "English"),
    "Virginia Woolf": ("England", "English"),
    "Robert Louis Stevenson": ("Scotland", "English"),
    "Arthur Conan Doyle": ("Scotland", "English"),
    "Walter Scott": ("Scotland", "English"),
    "James Joyce": ("Ireland", "English"),
    "Oscar Wilde": ("Ireland", "English"),
    "Bram Stoker": ("Ireland", "English"),
    "Jonathan Swift": ("Ireland", "English"),
    "Herman Melville": ("United States", "English"),
    "Mark Twain": ("United States", "English"),
    "F. Scott Fitzgerald": ("United States", "English"),
    "Ernest Hemingway": ("United States", "English"),
    "Harper Lee": ("United States", "English"),
    "John Steinbeck": ("United States", "English"),
    "J. D. Salinger": ("United States", "English"),
    "Louisa May Alcott": ("United States", "English"),
    "Harriet Beecher Stowe": ("United States", "English"),
    "Margaret Mitchell": ("United States", "English"),
    "Ray Bradbury": ("United States", "English"),
    "L. M. Montgomery": ("Canada", "English"),
    "Margaret Atwood": ("Canada", "English"),
    "Leo Tolstoy": ("Russia", "Russian"),
    "Fyodor Dostoevsky": ("Russia", "Russian"),
    "Alexander Pushkin": ("Russia", "Russian"),
    "Boris Pasternak": ("Russia", "Russian"),
    "Anton Chekhov": ("Russia", "Russian"),
    "Ivan Turgenev": ("Russia", "Russian"),
    "Aleksandr Solzhenitsyn": ("Russia", "Russian"),
    "Miguel de Cervantes": ("Spain", "Spanish"),
    "Federico García Lorca": ("Spain", "Spanish"),
    "Gabriel García Márquez": ("Colombia", "Spanish"),
    "Jorge Luis Borges": ("Argentina", "Spanish"),
    "Juan Rulfo": ("Mexico", "Spanish"),
    "Pablo Neruda": ("Chile", "Spanish"),
    "Victor Hugo": ("France", "French"),
    "Alexandre Dumas": ("France", "French"),
    "Gustave Flaubert": ("France", "French"),
    "Antoine de Saint-Exupéry": ("France", "French"),
    "Jules Verne": ("France", "French"),
    "Marcel Proust": ("France", "French"),
    "Molière": ("France", "French"),
    "Voltaire": ("France", "French"),
    "Émile Zola": ("France", "French"),
    "Johann Wolfgang von Goethe": ("Germany", "German"),
    "Thomas Mann": ("Germany", "German"),
    "Erich Maria Remarque": ("Germany", "German"),
    "Michael Ende": ("Germany", "German"),
    "Patrick Süskind": ("Germany", "German"),
    "Dante Alighieri": ("Italy", "Italian"),
    "Giovanni Boccaccio": ("Italy", "Italian"),
    "Niccolò Machiavelli": ("Italy", "Italian"),
    "Carlo Collodi": ("Italy", "Italian"),
    "Umberto Eco": ("Italy", "Italian"),
    "Alessandro Manzoni": ("Italy", "Italian"),
    "Haruki Murakami": ("Japan", "Japanese"),
    "Yasunari Kawabata": ("Japan", "Japanese"),
    "Murasaki Shikibu": ("Japan", "Japanese"),
    "Lu Xun": ("China", "Chinese"),
    "Cao Xueqin": ("China", "Chinese"),
    "Mo Yan": ("China", "Chinese"),
    "Henrik Ibsen": ("Norway", "Norwegian"),
    "Jostein Gaarder": ("Norway", "Norwegian"),
    "Astrid Lindgren": ("Sweden", "Swedish"),
    "Stieg Larsson": ("Sweden", "Swedish"),
    "Selma Lagerlöf": ("Sweden", "Swedish"),
    "Hans Christian Andersen": ("Denmark", "Danish"),
    "Paulo Coelho": ("Brazil", "Portuguese"),
    "Machado de Assis": ("Brazil", "Portuguese"),
    "José Saramago": ("Portugal", "Portuguese"),
    "Luís de Camões": ("Portugal", "Portuguese"),
    "Fernando Pessoa": ("Portugal", "Portuguese"),
    "Nikos Kazantzakis": ("Greece", "Greek"),
    "Orhan Pamuk": ("Turkey", "Turkish"),
    "Henryk Sienkiewicz": ("Poland", "Polish"),
    "Rabindranath Tagore": ("India", "Bengali"),
    "Chinua Achebe": ("Nigeria", None),
    "Naguib Mahfouz": ("Egypt", "Arabic"),
}

BOOKS: dict[str, str] = {
    "Pride and Prejudice": "Jane Austen",
    "Sense and Sensibility": "Jane Austen",
    "Hamlet": "William Shakespeare",
    "Macbeth": "William Shakespeare",
    "Romeo and Juliet": "William Shakespeare",
    "Oliver Twist": "Charles Dickens",
    "Great Expectations": "Charles Dickens",
    "A Christmas Carol": "Charles Dickens",
    "Frankenstein": "Mary Shelley",
    "Jane Eyre": "Charlotte Brontë",
    "Wuthering Heights": "Emily Brontë",
    "Alice's Adventures in Wonderland": "Lewis Carroll",
    "Robinson Crusoe": "Daniel Defoe",
    "The Canterbury Tales": "Geoffrey Chaucer",
    "Harry Potter and the Philosopher's Stone": "J. K. Rowling",
    "Murder on the Orient Express": "Agatha Christie",
    "Mrs Dalloway": "Virginia Woolf",
    "Treasure Island": "Robert Louis Stevenson",
    "The Hound of the Baskervilles": "Arthur Conan Doyle",
    "Ivanhoe": "Walter Scott",
    "Ulysses": "James Joyce",
    "The Picture of Dorian Gray": "Oscar Wilde",
    "Dracula": "Bram Stoker",
    "Gulliver's Travels": "Jonathan Swift",
    "Moby-Dick": "Herman Melville",
    "The Adventures of Tom Sawyer": "Mark Twain",
    "The Great Gatsby": "F. Scott Fitzgerald",
    "The Old Man and the Sea": "Ernest Hemingway",
    "To Kill a Mockingbird": "Harper Lee",
    "The Grapes of Wrath": "John Steinbeck",
    "The Catcher in the Rye": "J. D. Salinger",
    "Little Women": "Louisa May Alcott",
    "Uncle Tom's Cabin": "Harriet Beecher Stowe",
    "Gone with the Wind": "Margaret Mitchell",
    "Fahrenheit 451": "Ray Bradbury",
    "Anne of Green Gables": "L. M. Montgomery",
    "The Handmaid's Tale": "Margaret Atwood",
    "War and Peace": "Leo Tolstoy",
    "Anna Karenina": "Leo Tolstoy",
    "Crime and Punishment": "Fyodor Dostoevsky",
    "The Brothers Karamazov": "Fyodor Dostoevsky",
    "Eugene Onegin": "Alexander Pushkin",
    "Doctor Zhivago": "Boris Pasternak",
    "The Cherry Orchard": "Anton Chekhov",
    "Fathers and Sons": "Ivan Turgenev",
    "The Gulag Archipelago": "Aleksandr Solzhenitsyn",
    "Don Quixote": "Miguel de Cervantes",
    "Blood Wedding": "Federico García Lorca",
    "One Hundred Years of Solitude": "Gabriel García Márquez",
    "Love in the Time of Cholera": "Gabriel García Márquez",
    "Ficciones": "Jorge Luis Borges",
    "Pedro Páramo": "Juan Rulfo",
    "Twenty Love Poems and a Song of Despair": "Pablo Neruda",
    "Les Misérables": "Victor Hugo",
    "The Hunchback of Notre-Dame": "Victor Hugo",
    "The Three Musketeers": "Alexandre Dumas",
    "The Count of Monte Cristo": "Alexandre Dumas",
    "Madame Bovary": "Gustave Flaubert",
    "The Little Prince": "Antoine de Saint-Exupéry",
    "Twenty Thousand Leagues Under the Seas": "Jules Verne",
    "Around the World in Eighty Days": "Jules Verne",
    "In Search of Lost Time": "Marcel Proust",
    "Tartuffe": "Molière",
    "Candide": "Voltaire",
    "Germinal": "Émile Zola",
    "Faust": "Johann Wolfgang von Goethe",
    "The Sorrows of Young Werther": "Johann Wolfgang von Goethe",
    "The Magic Mountain": "Thomas Mann",
    "Buddenbrooks": "Thomas Mann",
    "All Quiet on the Western Front": "Erich Maria Remarque",
    "The Neverending Story": "Michael Ende",
    "Perfume: The Story of a Murderer": "Patrick Süskind",
    "The Divine Comedy": "Dante Alighieri",
    "The Decameron": "Giovanni Boccaccio",
    "The Prince": "Niccolò Machiavelli",
    "The Adventures of Pinocchio": "Carlo Collodi",
    "The Name of the Rose": "Umberto Eco",
    "The Betrothed": "Alessandro Manzoni",
    "Kafka on the Shore": "Haruki Murakami",
    "Snow Country": "Yasunari Kawabata",
    "The Tale of Genji": "Murasaki Shikibu",
    "The True Story of Ah Q": "Lu Xun",
    "Dream of the Red Chamber": "Cao Xueqin",
    "Red Sorghum": "Mo Yan",
    "A Doll's House": "Henrik Ibsen",
    "Peer Gynt": "Henrik Ibsen",
    "Sophie's World": "Jostein Gaarder",
    "Pippi Longstocking": "Astrid Lindgren",
    "The Girl with the Dragon Tattoo": "Stieg Larsson",
    "The Wonderful Adventures of Nils": "Selma Lagerlöf",
    "The Ugly Duckling": "Hans Christian Andersen",
    "The Snow Queen": "Hans Christian Andersen",
    "The Alchemist": "Paulo Coelho",
    "Dom Casmurro": "Machado de Assis",
    "Blindness": "José Saramago",
    "The Lusiads": "Luís de Camões",
    "The Book of Disquiet": "Fernando Pessoa",
    "The Last Temptation of Christ": "Nikos Kazantzakis",
    "My Name Is Red": "Orhan Pamuk",
    "Quo Vadis": "Henryk Sienkiewicz",
    "Gitanjali": "Rabindranath Tagore",
    "Things Fall Apart": "Chinua Achebe",
    "Palace Walk": "Naguib Mahfouz",
}

PAINTERS: dict[str, str] = {
    "Leonardo da Vinci": "Italy",
    "Michelangelo": "Italy",
    "Sandro Botticelli": "Italy",
    "Raphael": "Italy",
    "Caravaggio": "Italy",
    "Vincent van Gogh": "Netherlands",
    "Rembrandt": "Netherlands",
    "Johannes Vermeer": "Netherlands",
    "Piet Mondrian": "Netherlands",
    "Hieronymus Bosch": "Netherlands",
    "Pablo Picasso": "Spain",
    "Salvador Dalí": "Spain",
    "Diego Velázquez": "Spain",
    "Francisco Goya": "Spain",
    "Claude Monet": "France",
    "Pierre-Auguste Renoir": "France",
    "Eugène Delacroix": "France",
    "Georges Seurat": "France",
    "Paul Cézanne": "France",
    "Édouard Manet": "France",
    "Edvard Munch": "Norway",
    "Gustav Klimt": "Austria",
    "Katsushika Hokusai": "Japan",
    "Edward Hopper": "United States",
    "Andy Warhol": "United States",
    "Andrew Wyeth": "United States",
    "John Constable": "England",
    "J. M. W. Turner": "England",
    "Frida Kahlo": "Mexico",
    "René Magritte": "Belgium",
    "Caspar David Friedrich": "Germany",
    "Albrecht Dürer": "Germany",
    "Hans Holbein the Younger": "Germany",
    "Henri Rousseau": "France",
    "Thomas Gainsborough": "England",
    "Frederic Leighton": "England",
    "Théodore Géricault": "France",
    "Jacques-Louis David": "France",
    "Jean-François Millet": "France",
}

PAINTINGS: dict[str, str] = {
    "the Mona Lisa": "Leonardo da Vinci",
    "The Last Supper": "Leonardo da Vinci",
    "The Creation of Adam": "Michelangelo",
    "The Birth of Venus": "Sandro Botticelli",
    "The School of Athens": "Raphael",
    "The Calling of Saint Matthew": "Caravaggio",
    "The Starry Night": "Vincent van Gogh",
    "Sunflowers": "Vincent van Gogh",
    "The Potato Eaters": "Vincent van Gogh",
    "The Night Watch": "Rembrandt",
    "Girl with a Pearl Earring": "Johannes Vermeer",
    "The Milkmaid": "Johannes Vermeer",
    "Composition with Red, Blue and Yellow": "Piet Mondrian",
    "The Garden of Earthly Delights": "Hieronymus Bosch",
    "Guernica": "Pablo Picasso",
    "Les Demoiselles d'Avignon": "Pablo Picasso",
    "The Persistence of Memory": "Salvador Dalí",
    "Las Meninas": "Diego Velázquez",
    "The Third of May 1808": "Francisco Goya",
    "Impression, Sunrise": "Claude Monet",
    "Water Lilies": "Claude Monet",
    "Luncheon of the Boating Party": "Pierre-Auguste Renoir",
    "Liberty Leading the People": "Eugène Delacroix",
    "A Sunday Afternoon on the Island of La Grande Jatte": "Georges Seurat",
    "The Card Players": "Paul Cézanne",
    "Le Déjeuner sur l'herbe": "Édouard Manet",
    "The Scream": "Edvard Munch",
    "The Kiss": "Gustav Klimt",
    "The Great Wave off Kanagawa": "Katsushika Hokusai",
    "Nighthawks": "Edward Hopper",
    "Campbell's Soup Cans": "Andy Warhol",
    "Christina's World": "Andrew Wyeth",
    "The Hay Wain": "John Constable",
    "The Fighting Temeraire": "J. M. W. Turner",
    "The Two Fridas": "Frida Kahlo",
    "The Son of Man": "René Magritte",
    "The Treachery of Images": "René Magritte",
    "Wanderer above the Sea of Fog": "Caspar David Friedrich",
    "Young Hare": "Albrecht Dürer",
    "Lady with an Ermine": "Leonardo da Vinci",
    "Primavera": "Sandro Botticelli",
    "The Anatomy Lesson of Dr. Nicolaes Tulp": "Rembrandt",
    "Café Terrace at Night": "Vincent van Gogh",
    "The Lacemaker": "Johannes Vermeer",
    "Broadway Boogie Woogie": "Piet Mondrian",
    "Saturn Devouring His Son": "Francisco Goya",
    "The Weeping Woman": "Pablo Picasso",
    "The Old Guitarist": "Pablo Picasso",
    "The Elephants": "Salvador Dalí",
    "Woman with a Parasol": "Claude Monet",
    "The Sick Child": "Edvard Munch",
    "Portrait of Adele Bloch-Bauer I": "Gustav Klimt",
    "Early Sunday Morning": "Edward Hopper",
    "the Marilyn Diptych": "Andy Warhol",
    "Rain, Steam and Speed": "J. M. W. Turner",
    "Golconda": "René Magritte",
    "The Ambassadors": "Hans Holbein the Younger",
    "The Sleeping Gypsy": "Henri Rousseau",
    "The Blue Boy": "Thomas Gainsborough",
    "Mr and Mrs Andrews": "Thomas Gainsborough",
    "Flaming June": "Frederic Leighton",
    "The Raft of the Medusa": "Théodore Géricault",
    "The Death of Marat": "Jacques-Louis David",
    "The Gleaners": "Jean-François Millet",
}

COMPOSERS: dict[str, str] = {
    "Wolfgang Amadeus Mozart": "Austria",
    "Johann Strauss II": "Austria",
    "Franz Schubert": "Austria",
    "Joseph Haydn": "Austria",
    "Ludwig van Beethoven": "Germany",
    "Johann Sebastian Bach": "Germany",
    "Richard Wagner": "Germany",
    "Carl Orff": "Germany",
    "Johann Pachelbel": "Germany",
    "Antonio Vivaldi": "Italy",
    "Giuseppe Verdi": "Italy",
    "Giacomo Puccini": "Italy",
    "Gioachino Rossini": "Italy",
    "Pietro Mascagni": "Italy",
    "Pyotr Ilyich Tchaikovsky": "Russia",
    "Igor Stravinsky": "Russia",
    "Modest Mussorgsky": "Russia",
    "Nikolai Rimsky-Korsakov": "Russia",
    "Georges Bizet": "France",
    "Maurice Ravel": "France",
    "Claude Debussy": "France",
    "Hector Berlioz": "France",
    "Erik Satie": "France",
    "Camille Saint-Saëns": "France",
    "Edvard Grieg": "Norway",
    "Frédéric Chopin": "Poland",
    "George Gershwin": "United States",
    "Leonard Bernstein": "United States",
    "John Philip Sousa": "United States",
    "Aaron Copland": "United States",
    "Gustav Holst": "England",
    "Edward Elgar": "England",
    "Joaquín Rodrigo": "Spain",
}

MUSIC: dict[str, str] = {
    "The Magic Flute": "Wolfgang Amadeus Mozart",
    "Don Giovanni": "Wolfgang Amadeus Mozart",
    "Eine kleine Nachtmusik": "Wolfgang Amadeus Mozart",
    "The Blue Danube": "Johann Strauss II",
    "the Unfinished Symphony": "Franz Schubert",
    "the Surprise Symphony": "Joseph Haydn",
    "Für Elise": "Ludwig van Beethoven",
    "the Moonlight Sonata": "Ludwig van Beethoven",
    "the Brandenburg Concertos": "Johann Sebastian Bach",
    "The Ride of the Valkyries": "Richard Wagner",
    "Carmina Burana": "Carl Orff",
    "the Canon in D": "Johann Pachelbel",
    "The Four Seasons": "Antonio Vivaldi",
    "La Traviata": "Giuseppe Verdi",
    "Aida": "Giuseppe Verdi",
    "Madama Butterfly": "Giacomo Puccini",
    "Tosca": "Giacomo Puccini",
    "The Barber of Seville": "Gioachino Rossini",
    "Cavalleria rusticana": "Pietro Mascagni",
    "Swan Lake": "Pyotr Ilyich Tchaikovsky",
    "The Nutcracker": "Pyotr Ilyich Tchaikovsky",
    "The Rite of Spring": "Igor Stravinsky",
    "The Firebird": "Igor Stravinsky",
    "Pictures at an Exhibition": "Modest Mussorgsky",
    "Flight of the Bumblebee": "Nikolai Rimsky-Korsakov",
    "Carmen": "Georges Bizet",
    "Boléro": "Maurice Ravel",
    "Clair de Lune": "Claude Debussy",
    "Symphonie fantastique": "Hector Berlioz",
    "the Gymnopédies": "Erik Satie",
    "The Carnival of the Animals": "Camille Saint-Saëns",
    "In the Hall of the Mountain King": "Edvard Grieg",
    "the Minute Waltz": "Frédéric Chopin",
    "Rhapsody in Blue": "George Gershwin",
    "West Side Story": "Leonard Bernstein",
    "The Stars and Stripes Forever": "John Philip Sousa",
    "Appalachian Spring": "Aaron Copland",
    "The Planets": "Gustav Holst",
    "Pomp and Circumstance": "Edward Elgar",
    "Concierto de Aranjuez": "Joaquín Rodrigo",
}

COMPANIES: dict[str, str] = {
    "Toyota": "Japan",
    "Sony": "Japan",
    "Honda": "Japan",
    "Nintendo": "Japan",
    "Panasonic": "Japan",
    "Samsung": "South Korea",
    "Hyundai": "South Korea",
    "Kia": "South Korea",
    "Volkswagen": "Germany",
    "BMW": "Germany",
    "Siemens": "Germany",
    "Adidas": "Germany",
    "Bosch": "Germany",
    "Porsche": "Germany",
    "Lufthansa": "Germany",
    "Nestlé": "Switzerland",
    "Rolex": "Switzerland",
    "Novartis": "Switzerland",
    "Lindt": "Switzerland",
    "Ericsson": "Sweden",
    "H&M": "Sweden",
    "Volvo": "Sweden",
    "Electrolux": "Sweden",
    "Nokia": "Finland",
    "Lego": "Denmark",
    "Carlsberg": "Denmark",
    "Maersk": "Denmark",
    "Heineken": "Netherlands",
    "Philips": "Netherlands",
    "Ferrari": "Italy",
    "Gucci": "Italy",
    "Prada": "Italy",
    "Barilla": "Italy",
    "Lamborghini": "Italy",
    "Pirelli": "Italy",
    "Renault": "France",
    "L'Oréal": "France",
    "Michelin": "France",
    "Danone": "France",
    "Louis Vuitton": "France",
    "Hermès": "France",
    "Zara": "Spain",
    "Santander": "Spain",
    "Telefónica": "Spain",
    "Alibaba": "China",
    "Huawei": "China",
    "Tencent": "China",
    "Xiaomi": "China",
    "BYD": "China",
    "Tata Motors": "India",
    "Infosys": "India",
    "Petrobras": "Brazil",
    "Embraer": "Brazil",
    "Gazprom": "Russia",
    "Aeroflot": "Russia",
    "Microsoft": "United States",
    "Apple": "United States",
    "Coca-Cola": "United States",
    "Walmart": "United States",
    "Ford": "United States",
    "Nike": "United States",
    "Boeing": "United States",
    "Bombardier": "Canada",
    "BlackBerry": "Canada",
    "Qantas": "Australia",
    "Aramco": "Saudi Arabia",
}

# person -> country of birth (present-day country; people born where borders later changed are left out)
PEOPLE: dict[str, str] = {
    "Lionel Messi": "Argentina",
    "Diego Maradona": "Argentina",
    "Gabriel Batistuta": "Argentina",
    "Sergio Agüero": "Argentina",
    "Cristiano Ronaldo": "Portugal",
    "Luís Figo": "Portugal",
    "Neymar": "Brazil",
    "Pelé": "Brazil",
    "Ayrton Senna": "Brazil",
    "Ronaldinho": "Brazil",
    "Kaká": "Brazil",
    "Zinedine Zidane": "France",
    "Kylian Mbappé": "France",
    "Thierry Henry": "France",
    "Karim Benzema": "France",
    "Édith Piaf": "France",
    "Robert Lewandowski": "Poland",
    "Iga Świątek": "Poland",
    "Mohamed Salah": "Egypt",
    "Omar Sharif": "Egypt",
    "Usain Bolt": "Jamaica",
    "Bob Marley": "Jamaica",
    "Roger Federer": "Switzerland",
    "Rafael Nadal": "Spain",
    "Andrés Iniesta": "Spain",
    "Pau Gasol": "Spain",
    "Fernando Alonso": "Spain",
    "Enrique Iglesias": "Spain",
    "Serena Williams": "United States",
    "Michael Jordan": "United States",
    "LeBron James": "United States",
    "Tiger Woods": "United States",
    "Elvis Presley": "United States",
    "Taylor Swift": "United States",
    "Wayne Gretzky": "Canada",
    "Celine Dion": "Canada",
    "Justin Bieber": "Canada",
    "Shakira": "Colombia",
    "James Rodríguez": "Colombia",
    "Radamel Falcao": "Colombia",
    "Björk": "Iceland",
    "Yao Ming": "China",
    "Li Na": "China",
    "Lang Lang": "China",
    "Sachin Tendulkar": "India",
    "Virat Kohli": "India",
    "Son Heung-min": "South Korea",
    "Kim Yuna": "South Korea",
    "Shohei Ohtani": "Japan",
    "Ichiro Suzuki": "Japan",
    "Hayao Miyazaki": "Japan",
    "Akira Kurosawa": "Japan",
    "Zlatan Ibrahimović": "Sweden",
    "Björn Borg": "Sweden",
    "Ingmar Bergman": "Sweden",
    "Luciano Pavarotti": "Italy",
    "Andrea Bocelli": "Italy",
    "Francesco Totti": "Italy",
    "Gianluigi Buffon": "Italy",
    "Andrea Pirlo": "Italy",
    "Arnold Schwarzenegger": "Austria",
    "Niki Lauda": "Austria",
    "Michael Schumacher": "Germany",
    "Franz Beckenbauer": "Germany",
    "Steffi Graf": "Germany",
    "Dirk Nowitzki": "Germany",
    "Albert Einstein": "Germany",
    "Maria Sharapova": "Russia",
    "Yuri Gagarin": "Russia",
    "Adele": "England",
    "Ed Sheeran": "England",
    "Elton John": "England",
    "Paul McCartney": "England",
    "David Beckham": "England",
    "Lewis Hamilton": "England",
    "Magnus Carlsen": "Norway",
    "Roald Amundsen": "Norway",
    "Johan Cruyff": "Netherlands",
    "Arjen Robben": "Netherlands",
    "Kimi Räikkönen": "Finland",
    "Mika Häkkinen": "Finland",
    "Ferenc Puskás": "Hungary",
    "Giannis Antetokounmpo": "Greece",
    "Stefanos Tsitsipas": "Greece",
    "Haile Gebrselassie": "Ethiopia",
    "Eliud Kipchoge": "Kenya",
    "Sadio Mané": "Senegal",
    "Luis Suárez": "Uruguay",
    "Edinson Cavani": "Uruguay",
    "Alexis Sánchez": "Chile",
    "Conor McGregor": "Ireland",
    "Gareth Bale": "Wales",
    "Rihanna": "Barbados",
    "Manny Pacquiao": "Philippines",
    "Gloria Estefan": "Cuba",
}

DISHES: dict[str, str] = {
    "sushi": "Japan",
    "sashimi": "Japan",
    "sukiyaki": "Japan",
    "miso soup": "Japan",
    "tonkatsu": "Japan",
    "paella": "Spain",
    "gazpacho": "Spain",
    "pizza": "Italy",
    "risotto": "Italy",
    "lasagna": "Italy",
    "tiramisu": "Italy",
    "carbonara": "Italy",
    "ratatouille": "France",
    "bouillabaisse": "France",
    "coq au vin": "France",
    "bratwurst": "Germany",
    "Black Forest cake": "Germany",
    "goulash": "Hungary",
    "pierogi": "Poland",
    "moussaka": "Greece",
    "souvlaki": "Greece",
    "pad thai": "Thailand",
    "tom yum": "Thailand",
    "pho": "Vietnam",
    "banh mi": "Vietnam",
    "kung pao chicken": "China",
    "mapo tofu": "China",
    "dim sum": "China",
    "feijoada": "Brazil",
    "haggis": "Scotland",
    "fish and chips": "England",
    "poutine": "Canada",
    "fondue": "Switzerland",
    "rösti": "Switzerland",
    "butter chicken": "India",
    "smørrebrød": "Denmark",
    "pastel de nata": "Portugal",
    "stroopwafel": "Netherlands",
    "pelmeni": "Russia",
    "beef stroganoff": "Russia",
    "Sachertorte": "Austria",
    "jerk chicken": "Jamaica",
    "ackee and saltfish": "Jamaica",
    "udon": "Japan",
    "okonomiyaki": "Japan",
    "takoyaki": "Japan",
    "tortellini": "Italy",
    "ossobuco": "Italy",
    "cassoulet": "France",
    "croque monsieur": "France",
    "currywurst": "Germany",
    "gyros": "Greece",
    "spanakopita": "Greece",
    "massaman curry": "Thailand",
    "xiaolongbao": "China",
    "bigos": "Poland",
    "masala dosa": "India",
    "Yorkshire pudding": "England",
    "Cornish pasty": "England",
    "pão de queijo": "Brazil",
    "lomo saltado": "Peru",
    "koshari": "Egypt",
    "mansaf": "Jordan",
    "kabsa": "Saudi Arabia",
    "nasi lemak": "Malaysia",
}

# --------------------------------------------------------------------------------------------------------------
# Compositions: templates over {e1}/{E1} (entity, sentence-initial form), {b}/{B} (bridge in running text /
# sentence-initial), {a} (" the" where the answer is a country written with "the", else "") and, in hop1,
# {bt} (" the" where the bridge is such a country).
# --------------------------------------------------------------------------------------------------------------


def _country_fact(field: str) -> Callable[[str], str | None]:
    return lambda country: getattr(COUNTRIES[country], field)


def _author_fact(index: int) -> Callable[[str], str | None]:
    return lambda author: AUTHORS[author][index]


@dataclass(frozen=True)
class Composition:
    slug: str
    r1: str
    r2: str
    two_hop: str
    hop1: str
    hop2: str
    hop1_table: dict[str, str]  # e1 -> bridge
    answer_of: Callable[[str], str | None]  # bridge -> answer


LOCATED = "{E1} is located in the country of{bt}"
COMPOSITIONS: list[Composition] = [
    Composition("landmark-country-capital", "located_in_country", "capital",
                "The capital of the country where {e1} is located is", LOCATED, "The capital of {b} is",
                LANDMARKS, _country_fact("capital")),
    Composition("landmark-country-language", "located_in_country", "main_language",
                "The main language spoken in the country where {e1} is located is", LOCATED,
                "The main language spoken in {b} is", LANDMARKS, _country_fact("language")),
    Composition("landmark-country-currency", "located_in_country", "currency",
                "The currency of the country where {e1} is located is the", LOCATED, "The currency of {b} is the",
                LANDMARKS, _country_fact("currency")),
    Composition("landmark-country-continent", "located_in_country", "continent",
                "The country where {e1} is located is on the continent of", LOCATED, "{B} is on the continent of",
                LANDMARKS, _country_fact("continent")),
    Composition("book-author-nationality", "author", "nationality",
                "The author of {e1} was a writer from{a}", "{E1} was written by", "{B} was a writer from{a}",
                BOOKS, _author_fact(0)),
    Composition("book-author-language", "author", "native_language",
                "The native language of the author of {e1} was", "{E1} was written by",
                "The native language of {b} was", BOOKS, _author_fact(1)),
    Composition("painting-painter-nationality", "painter", "nationality",
                "The artist who painted {e1} was from{a}", "{E1} was painted by", "{B} was an artist from{a}",
                PAINTINGS, PAINTERS.get),
    Composition("music-composer-nationality", "composer", "nationality",
                "The composer of {e1} was from{a}", "{E1} was composed by", "{B} was a composer from{a}",
                MUSIC, COMPOSERS.get),
    Composition("company-country-capital", "headquarters_country", "capital",
                "The capital of the country where {e1} is headquartered is",
                "{E1} is headquartered in the country of{bt}", "The capital of {b} is",
                COMPANIES, _country_fact("capital")),
    Composition("person-country-capital", "country_of_birth", "capital",
                "The capital of the country where {e1} was born is", "{E1} was born in the country of{bt}",
                "The capital of {b} is", PEOPLE, _country_fact("capital")),
    Composition("person-country-language", "country_of_birth", "main_language",
                "The main language spoken in the country where {e1} was born is",
                "{E1} was born in the country of{bt}", "The main language spoken in {b} is",
                PEOPLE, _country_fact("language")),
    Composition("dish-country-capital", "country_of_origin", "capital",
                "The capital of the country where {e1} comes from is",
                "{E1} is a traditional dish from the country of{bt}", "The capital of {b} is",
                DISHES, _country_fact("capital")),
]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _the(name: str) -> bool:
    return name in COUNTRIES and COUNTRIES[name].the


def candidates(comp: Composition) -> list[dict[str, str]]:
    """All items of one composition, in table order (before pairing)."""
    items = []
    for e1, bridge in comp.hop1_table.items():
        answer = comp.answer_of(bridge)
        if answer is None:
            continue
        b = f"the {bridge}" if _the(bridge) else bridge
        fill = {"e1": e1, "E1": _cap(e1), "b": b, "B": _cap(b),
                "a": " the" if _the(answer) else "", "bt": " the" if _the(bridge) else ""}
        for name in (bridge, answer):  # e1 must not give the bridge or the answer away
            assert name.lower() not in e1.lower(), (comp.slug, e1, name)
        assert bridge != answer, (comp.slug, e1)
        items.append({"two_hop": comp.two_hop.format(**fill), "bridge": bridge, "answer": answer, "e1": e1,
                      "r1": comp.r1, "r2": comp.r2, "hop1": comp.hop1.format(**fill),
                      "hop2": comp.hop2.format(**fill)})
    return items


# --------------------------------------------------------------------------------------------------------------
# Tokenizers and pairing
# --------------------------------------------------------------------------------------------------------------


def load_tokenizers() -> dict[str, Any]:
    """The SmolLM2 and Gemma 3 tokenizers of the two embedded models (offline, from the converted cache)."""
    from transformers import AutoTokenizer

    from bridgeprobe.probes.model.load import EMBEDDED, convert_gguf

    return {alias: AutoTokenizer.from_pretrained(convert_gguf(EMBEDDED[alias].locate()))
            for alias in ("smollm2-135m", "gemma3-270m")}


def signature(item: dict[str, str], toks: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(two_hop length per tokenizer, answer first token after the two-hop prompt per tokenizer)."""
    from bridgeprobe.probes.model.targets import target_ids

    lengths = tuple(len(tok(item["two_hop"]).input_ids) for tok in toks.values())
    firsts = tuple(target_ids(tok, item["two_hop"], item["answer"])[0] for tok in toks.values())
    return lengths, firsts


def pair_up(items: list[dict[str, str]], toks: dict[str, Any]) -> list[tuple[int, int]]:
    """Greedy matching: partners share two_hop lengths under every tokenizer and differ in bridge and in the
    answer's first token under every tokenizer. Most constrained items are matched first (ties: table order)."""
    sigs = [signature(item, toks) for item in items]

    def ok(i: int, j: int) -> bool:
        return (i != j and sigs[i][0] == sigs[j][0] and items[i]["bridge"] != items[j]["bridge"]
                and all(a != b for a, b in zip(sigs[i][1], sigs[j][1])))

    options = {i: [j for j in range(len(items)) if ok(i, j)] for i in range(len(items))}
    free = set(range(len(items)))
    pairs = []
    for i in sorted(free, key=lambda k: (len(options[k]), k)):
        if i not in free:
            continue
        partners = [j for j in options[i] if j in free]
        if not partners:
            continue
        j = min(partners, key=lambda k: (sum(m in free for m in options[k]), k))
        free -= {i, j}
        pairs.append((i, j))
    return pairs


def build(toks: dict[str, Any]) -> list[dict[str, str]]:
    """All paired items, compositions in table order, items in table order, ids ``<slug>-NNN``."""
    out: list[dict[str, str]] = []
    for comp in COMPOSITIONS:
        items = candidates(comp)
        partner = {}
        for i, j in pair_up(items, toks):
            partner[i], partner[j] = j, i
        kept = sorted(partner)
        ids = {i: f"{comp.slug}-{n:03d}" for n, i in enumerate(kept)}
        for i in kept:
            out.append({"id": ids[i], **items[i], "pair": ids[partner[i]]})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=OUT)
    args = parser.parse_args(argv)
    items = build(load_tokenizers())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    counts = Counter(item["id"].rsplit("-", 1)[0] for item in items)
    for slug, n in counts.items():
        print(f"{slug:32s} {n}")
    print(f"{len(items)} items in {len(counts)} compositions -> {args.output}")


if __name__ == "__main__":
    main()
