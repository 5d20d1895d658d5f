"""The ``pymap`` command: parsing (typer), rendering for people and machines.

Owns the app (:mod:`.app`, which builds only the command a run names), the commands by
job (:mod:`.commands`), the options they share and how they say, fail and exit
(:mod:`.options`, :mod:`.running`), and rendering: tables and piped columns
(:mod:`.render`, :mod:`.columns`), event lines (:mod:`.eventsout`, :mod:`.fleetout`),
``doctor`` and ``top`` (:mod:`.doctor`, :mod:`.top`, :mod:`.topui`).

Must never hold logic a library user would need: that lives in :mod:`consumers`.
"""
