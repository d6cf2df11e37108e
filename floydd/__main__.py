from floydd.cli import main

raise SystemExit(main())
