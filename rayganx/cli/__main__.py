from rayganx.cli import main

main()
