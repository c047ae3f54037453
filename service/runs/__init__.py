"""A run's life in this process, one unit per stage.

``admission`` (check, reserve, persist) → ``supervision`` (run the task function,
its deadline, a cancel) → ``service.finish`` (the terminal write and what follows
it). ``active`` is the table of runs this process holds, which all of them share;
``drain`` is the one object that stops the process's runs when the replica goes.
``service.scheduler`` puts them together.
"""
