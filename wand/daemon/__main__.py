from wand.daemon.main import run

run()
