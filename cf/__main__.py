from cf.cli import main

main()
