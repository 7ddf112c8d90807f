from spec_plugins.tools.train_drafter.cli import main

main()
