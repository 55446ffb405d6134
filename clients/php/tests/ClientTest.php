<?php

declare(strict_types=1);

namespace Bwp\Tests;

use Bwp\Client;
use Bwp\Exception\Rejected;
use Bwp\Exception\Unreachable;
use Bwp\Exception\WaitTimeout;
use Bwp\Job;
use PHPUnit\Framework\TestCase;

/**
 * Against a real bwp (tests/test_php_client.py starts it, a sink that echoes what it got, and
 * a stand-in that answers as the Go daemon does) and passes their addresses in the environment.
 */
final class ClientTest extends TestCase
{
    private static function env(string $name): string
    {
        $value = getenv($name);
        if ($value === false || $value === '') {
            self::markTestSkipped("$name is not set: run through tests/test_php_client.py");
        }
        return $value;
    }

    private function client(array $options = []): Client
    {
        return new Client(self::env('BWP_URL'), $options + ['token' => self::env('BWP_TOKEN')]);
    }

    private function sink(string $path): string
    {
        return self::env('SINK_URL') . $path;
    }

    private function finished(Client $client, string $id, float $timeout = 10): Job
    {
        $deadline = microtime(true) + $timeout;
        while (microtime(true) < $deadline) {
            $job = $client->job($id);
            if ($job !== null && $job->isFinished()) {
                return $job;
            }
            usleep(50_000);
        }
        self::fail("job $id did not finish within {$timeout}s");
    }

    public function testAFluentJobInAnyOrderIsSentAsDescribed(): void
    {
        $bwp = $this->client();
        $a = $bwp->post($this->sink('/hook'))->json(['order' => 42])->header('X-Sig', 'abc')
            ->onQueue('hooks')->withId('php-fluent')->retries(2)->timeout(5);
        $b = $bwp->post($this->sink('/hook'))->timeout(5)->retries(2)->withId('php-fluent')
            ->onQueue('hooks')->header('X-Sig', 'abc')->json(['order' => 42]);
        self::assertEquals($a->toArray(), $b->toArray());
        self::assertSame('php-fluent', $a->dispatch());

        $job = $this->finished($bwp, 'php-fluent');
        self::assertTrue($job->isCompleted());
        self::assertFalse($job->hasError());
        self::assertSame(1, $job->attempts());
        self::assertSame('hooks', $job->queue());
        self::assertSame(200, $job->result()['status']);
        $echo = json_decode($job->result()['body'], true);
        self::assertSame('POST', $echo['method']);
        self::assertSame('abc', $echo['headers']['X-Sig']);
        self::assertSame(['order' => 42], json_decode($echo['body'], true));
        self::assertInstanceOf(\DateTimeImmutable::class, $job->finishedAt());
    }

    public function testFormsAndRawBodies(): void
    {
        $bwp = $this->client();
        $id = $bwp->put($this->sink('/raw'))->body("\x00\x01binary\xff")->dispatch();
        $form = $bwp->post($this->sink('/form'))->form(['user' => 42, 'name' => 'Zoë'])->dispatch();
        $raw = json_decode($this->finished($bwp, $id)->result()['body'], true);
        self::assertSame(base64_encode("\x00\x01binary\xff"), $raw['body_base64']);
        $sent = json_decode($this->finished($bwp, $form)->result()['body'], true);
        self::assertSame('user=42&name=Zo%C3%AB', $sent['body']);
        self::assertSame('application/x-www-form-urlencoded', $sent['headers']['Content-Type']);
    }

    public function testEveryFormOfDelay(): void
    {
        $bwp = $this->client();
        $delay = fn ($when) => $bwp->get($this->sink('/d'))->delay($when)->toArray();
        self::assertSame(5, $delay(5)['delay']);
        self::assertSame(1.5, $delay(1.5)['delay']);
        self::assertEqualsWithDelta(600, $delay('PT10M')['delay'], 0.01);
        self::assertEqualsWithDelta(108000, $delay('1 day + 6 hours')['delay'], 0.01);
        self::assertEqualsWithDelta(3600, $delay(new \DateInterval('PT1H'))['delay'], 0.01);
        $at = $delay(new \DateTimeImmutable('2030-01-02 03:04:05', new \DateTimeZone('Europe/Berlin')));
        self::assertSame('2030-01-02T02:04:05.000Z', $at['at']);
        self::assertArrayNotHasKey('delay', $at);
        foreach (['next tuesday-ish', 'P1X', -1] as $bad) {
            try {
                $delay($bad);
                self::fail("delay accepted " . var_export($bad, true));
            } catch (\InvalidArgumentException $e) {
                self::assertStringContainsString('delay', $e->getMessage());
            }
        }

        $id = $bwp->get($this->sink('/later'))->delay('PT30S')->withId('php-later')->dispatch();
        $job = $bwp->job($id);
        self::assertSame('delayed', $job->state());
        self::assertTrue($job->isPending());
        self::assertEqualsWithDelta(time() + 30, $job->nextAttemptAt()->getTimestamp(), 2);
        self::assertTrue($bwp->cancel($id)->isCancelled());
        self::assertTrue($bwp->job($id)->isCancelled());
    }

    public function testUniqueAndOnceSkipDuplicates(): void
    {
        $bwp = $this->client();
        $job = fn () => $bwp->get($this->sink('/slow?sleep=1'))->withId('php-unique')->unique();
        self::assertSame('php-unique', $job()->dispatch());
        self::assertNull($job()->dispatch()); // still pending
        $once = fn () => $bwp->get($this->sink('/once'))->withId('php-once')->once();
        self::assertSame('php-once', $once()->dispatch());
        $this->finished($bwp, 'php-once');
        self::assertNull($once()->dispatch()); // ran already
    }

    public function testWaitReturnsTheOutcomeOrTimesOut(): void
    {
        $bwp = $this->client();
        $job = $bwp->get($this->sink('/now'))->wait(10);
        self::assertTrue($job->isCompleted());
        self::assertSame('GET', json_decode($job->result()['body'], true)['method']);
        try {
            $bwp->get($this->sink('/slow?sleep=2'))->withId('php-slow')->wait(0.3);
            self::fail('no WaitTimeout');
        } catch (WaitTimeout $e) {
            self::assertSame(['php-slow'], $e->ids);
            self::assertSame(['php-slow'], $e->pending);
        }
    }

    public function testDeadLettersAreListedAndReplayed(): void
    {
        $bwp = $this->client();
        $bwp->get($this->sink('/broken?status=500'))->withId('php-dead')->retries(0)->dispatch();
        $job = $this->finished($bwp, 'php-dead');
        self::assertTrue($job->hasFailed());
        self::assertTrue($job->hasError());
        self::assertSame(500, $job->status());
        self::assertContains('php-dead', array_map(fn (Job $j) => $j->id(), $bwp->deadLetters()));
        $bwp->retry('php-dead'); // sent again (and, the sink still broken, failed again)
        $deadline = microtime(true) + 10;
        do {
            $again = $bwp->job('php-dead');
            if ($again->hasFailed() && $again->finishedAt() > $job->finishedAt()) {
                return;
            }
            usleep(50_000);
        } while (microtime(true) < $deadline);
        self::fail('the replayed job did not run again');
    }

    public function testAUnixSocketAndTheToken(): void
    {
        $bwp = new Client('http://localhost', ['socket' => self::env('BWP_SOCKET'), 'token' => self::env('BWP_TOKEN')]);
        $id = $bwp->get($this->sink('/unix'))->dispatch();
        self::assertTrue($this->finished($bwp, $id)->isCompleted());
        $this->expectException(Rejected::class);
        $this->expectExceptionCode(401);
        (new Client(self::env('BWP_URL')))->job($id);
    }

    public function testDownMeansAnExceptionOrTheChosenFallback(): void
    {
        $down = self::env('CLOSED_URL');
        try {
            (new Client($down))->get($this->sink('/x'))->dispatch();
            self::fail('no exception');
        } catch (Unreachable $e) {
            self::assertStringContainsString('does not answer', $e->getMessage());
        }
        $log = ini_set('error_log', '/dev/null');
        try {
            self::assertNull((new Client($down, ['on_failure' => 'drop']))->get($this->sink('/x'))->dispatch());
            $spool = tempnam(sys_get_temp_dir(), 'bwp-spool-');
            unlink($spool);
            $spooling = new Client($down, ['on_failure' => 'spool', 'spool' => $spool]);
            self::assertNull($spooling->get($this->sink('/spooled'))->withId('php-spooled')->dispatch());
            self::assertSame(1, (new \Bwp\Spool($spool))->count());
        } finally {
            ini_set('error_log', $log === false ? '' : $log);
        }
        // the next dispatch that reaches bwp sends what was kept first
        $bwp = $this->client(['on_failure' => 'spool', 'spool' => $spool]);
        self::assertSame('php-after', $bwp->get($this->sink('/after'))->withId('php-after')->dispatch());
        self::assertTrue($this->finished($bwp, 'php-spooled')->isCompleted());
        self::assertSame(0, (new \Bwp\Spool($spool))->count());
        unlink($spool);
    }

    public function testA503IsTriedAgainAfterRetryAfter(): void
    {
        $go = self::env('GO_URL');
        $bwp = new Client($go, ['retry_503' => 2, 'max_retry_after' => 0.2]);
        $started = microtime(true);
        self::assertNull($bwp->get('http://127.0.0.1:9/busy')->dispatch()); // 503, 503, 200
        self::assertGreaterThanOrEqual(0.4, microtime(true) - $started);
        self::assertSame(3, (int) file_get_contents("$go/count?url=busy"));
    }

    public function testPlainSubmitsWorkWithTheGoDaemon(): void
    {
        $go = self::env('GO_URL');
        $bwp = new Client($go);
        self::assertNull($bwp->post('http://127.0.0.1:9/go')->form(['a' => '1'])->header('X-A', 'b')->dispatch());
        $sent = json_decode(file_get_contents("$go/last"), true);
        self::assertSame([['url' => 'http://127.0.0.1:9/go', 'method' => 'POST', 'parameters' => ['a' => '1'],
            'headers' => ['X-A' => 'b']]], $sent);
        $this->expectException(Rejected::class);
        $bwp->post('')->dispatch(); // the Go daemon's 400 is text, not JSON
    }

    public function testBatchedJobsGoInOnePostWhenTheRequestEnds(): void
    {
        $script = tempnam(sys_get_temp_dir(), 'bwp-batch-') . '.php';
        $autoload = realpath(__DIR__ . '/bootstrap.php');
        file_put_contents($script, <<<PHP
            <?php
            require '$autoload';
            \$bwp = Bwp\\Client::local()->batching();
            foreach (['b1', 'b2', 'b3'] as \$id) {
                echo \$bwp->get(getenv('SINK_URL') . "/batch/\$id")->withId("php-batch-\$id")->dispatch(), "\\n";
            }
            echo "page done\\n";
            PHP);
        $before = $this->submits();
        $out = shell_exec(PHP_BINARY . ' ' . escapeshellarg($script));
        unlink($script);
        self::assertSame("php-batch-b1\nphp-batch-b2\nphp-batch-b3\npage done\n", $out);
        self::assertSame($before + 1, $this->submits()); // one POST for the three
        $bwp = $this->client();
        foreach (['b1', 'b2', 'b3'] as $id) {
            self::assertTrue($this->finished($bwp, "php-batch-$id")->isCompleted());
        }
    }

    private function submits(): int
    {
        $text = file_get_contents(self::env('BWP_URL') . '/metrics');
        preg_match_all('/^bwp_api_requests_total\{[^}]*endpoint="submit"[^}]*\} (\S+)$/m', $text, $m);
        return (int) array_sum(array_map('floatval', $m[1]));
    }
}
