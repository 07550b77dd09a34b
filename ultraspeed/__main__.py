from ultraspeed.cli import main

raise SystemExit(main())
