from memtrace.commands import run

run()
