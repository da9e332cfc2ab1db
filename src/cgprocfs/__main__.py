from cgprocfs.cli import main

raise SystemExit(main())
