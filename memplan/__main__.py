from memplan.cli import entry

entry()
