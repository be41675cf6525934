from etcdforge.cli import main

main()
