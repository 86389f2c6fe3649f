from backprop_ninja.cli import entry

entry()
