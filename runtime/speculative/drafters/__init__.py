"""Drafters: where a speculative step's guesses come from. Every drafter has the ``Drafter`` interface
(``drafters.base``) and returns one ``DraftTree`` per row."""
