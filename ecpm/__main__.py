from ecpm.cli import main

raise SystemExit(main())
