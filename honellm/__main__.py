from honellm.cli.app import main

main()
