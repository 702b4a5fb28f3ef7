from memtrace.cli import run

run()
